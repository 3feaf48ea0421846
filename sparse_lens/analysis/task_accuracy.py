"""Task accuracy: RULER NIAH / variable tracking answered by the model run sparsely and densely.

The same model answers the same samples twice, greedily: once with dense attention
(``mode="dense"``, torch SDPA: the baseline) and once on the sparse attention of a TracingConfig. Each answer is one prefill of the
prompt (dense, or sparse) followed by KV-cached decode steps (each new token attends to every
cached key; see ``sparse_lens.tl.generation``), so the two runs differ only in the prefill.

Scoring is RULER's (:func:`~sparse_lens.data.ruler_scoring.ruler_score`: ``string_match_all``
after RULER's post-processing, NIAH and variable tracking): control characters of the output
become newlines, then a sample scores the share of its expected strings found in the output,
case-insensitively; a task's accuracy is the mean over samples (RULER prints it x100).
Decoding stops at EOS, after ``max_new_tokens``, or (``stop_when_answered``, default) once every
expected string is in the output, which cannot change a score: more tokens only add matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from sparse_lens.analysis.needle import NEEDLE_MASS_THRESHOLD, NeedleProbe
from sparse_lens.config import TracingConfig
from sparse_lens.data.niah import NeedleSample
from sparse_lens.data.ruler import make_sample
from sparse_lens.data.ruler_scoring import ruler_score
from sparse_lens.tl.generation import greedy_generate
from sparse_lens.tl.model import HookedSparseTransformer

DEFAULT_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                 "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt")


def ruler_samples(
    tokenizer: Any,
    length: int,
    tasks: Sequence[str] = DEFAULT_TASKS,
    samples_per_task: int = 1,
    *,
    seed: int = 0,
    answer_tokens: int | None = None,
) -> list[tuple[str, NeedleSample]]:
    """``(task, sample)`` pairs: ``samples_per_task`` seeded samples of each task (seeds ``seed``,
    ``seed + 1``, ...), each at most ``length - answer_tokens`` tokens (RULER's budget by default)."""
    return [(task, make_sample(task, tokenizer, length, seed=seed + i, answer_tokens=answer_tokens))
            for i in range(samples_per_task) for task in tasks]


@dataclass
class RulerRecord:
    """One sample answered densely and sparsely."""

    task: str | None
    length: int  # prompt tokens
    answers: list[str]
    dense_output: str
    sparse_output: str
    dense_score: float
    sparse_score: float
    dense_new_tokens: int
    sparse_new_tokens: int
    dense_seconds: float  # prefill + decode (needle probe excluded)
    sparse_seconds: float
    needle: dict | None = None  # NeedleFidelity.summary() of the dense prefill, with needles=True

    @property
    def same_output(self) -> bool:
        return self.dense_output == self.sparse_output

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "same_output": self.same_output}


@dataclass
class RulerAccuracy:
    """Dense and sparse accuracy over a set of samples (fractions in [0, 1]; RULER prints x100)."""

    records: list[RulerRecord]
    stream: dict  # the sparse TracingConfig
    max_new_tokens: int
    settings: dict = field(default_factory=dict)

    @property
    def dense_accuracy(self) -> float:
        return float(np.mean([r.dense_score for r in self.records])) if self.records else float("nan")

    @property
    def sparse_accuracy(self) -> float:
        return float(np.mean([r.sparse_score for r in self.records])) if self.records else float("nan")

    @property
    def output_agreement(self) -> float:
        """Share of samples whose sparse answer is the dense answer, token for token (as text)."""
        return float(np.mean([r.same_output for r in self.records])) if self.records else float("nan")

    def per_task(self) -> dict[str, dict[str, float]]:
        tasks: dict[str, list[RulerRecord]] = {}
        for record in self.records:
            tasks.setdefault(record.task or "?", []).append(record)
        return {task: {"samples": len(rs), "dense": float(np.mean([r.dense_score for r in rs])),
                       "sparse": float(np.mean([r.sparse_score for r in rs]))} for task, rs in tasks.items()}

    def summary(self) -> dict[str, Any]:
        def seconds(attr: str) -> float | None:
            return float(np.mean([getattr(r, attr) for r in self.records])) if self.records else None

        summary = {
            "samples": len(self.records),
            "dense_accuracy": self.dense_accuracy,
            "sparse_accuracy": self.sparse_accuracy,
            "output_agreement": self.output_agreement,
            "max_new_tokens": self.max_new_tokens,
            "dense_seconds_per_sample": seconds("dense_seconds"),
            "sparse_seconds_per_sample": seconds("sparse_seconds"),
            "per_task": self.per_task(),
        }
        needles = [r.needle for r in self.records if r.needle is not None]
        if needles:
            heads = sum(n["needle_heads"] for n in needles)
            missed = sum(n["missed_heads"] for n in needles)
            summary["needle_heads"], summary["needle_missed_heads"] = heads, missed
            summary["needle_kept_share"] = None if heads == 0 else 1.0 - missed / heads
        return summary

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "stream": self.stream, **self.settings,
                "records": [record.to_dict() for record in self.records]}


@torch.no_grad()
def ruler_accuracy(
    model: HookedSparseTransformer,
    samples: Iterable[NeedleSample | tuple[str, NeedleSample]],
    stream: TracingConfig | None = None,
    *,
    max_new_tokens: int = 64,
    stop_when_answered: bool = True,
    needles: bool = False,
    needle_threshold: float = NEEDLE_MASS_THRESHOLD,
    progress: bool = True,
    decode: Callable[[list[int]], str] | None = None,
) -> RulerAccuracy:
    """Greedy answers of ``model`` on ``samples``, with dense attention and with ``stream`` (default:
    the model's config) run sparsely, scored as RULER does.

    ``samples``: NeedleSamples, or ``(task, sample)`` pairs (see :func:`ruler_samples`).
    ``needles``: also record, during the dense prefill, :func:`needle_fidelity` of ``stream`` at the
    last prompt token (its summary lands in each record's ``needle``).
    ``decode``: new token ids -> text (default: the model's tokenizer, special tokens skipped).
    """
    stream = stream or model.stream
    decode = decode or (lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True))
    eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
    pairs = [item if isinstance(item, tuple) else (None, item) for item in samples]
    records: list[RulerRecord] = []
    bar = tqdm(pairs, desc="ruler", disable=not progress)
    for task, sample in bar:
        tokens = torch.tensor([sample.input_ids], device=model.cfg.device)
        probe = NeedleProbe(sample.needle_spans, stream, model.cfg.n_layers, threshold=needle_threshold) if needles else None
        answer_kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id, "decode": decode,
                         "answers": sample.answers if stop_when_answered else None}
        with (model.stream_settings(**{**stream.fields_dict(), "mode": "dense"}),
              model.hooks(fwd_hooks=probe.hooks(model) if probe else [])):
            dense_output, dense_new, dense_seconds = _greedy_answer(model, tokens, **answer_kwargs)
        with model.stream_settings(**{**stream.fields_dict(), "mode": "sparse", "keep_qk": False}):
            sparse_output, sparse_new, sparse_seconds = _greedy_answer(model, tokens, **answer_kwargs)
        records.append(RulerRecord(
            task=task, length=sample.length, answers=list(sample.answers),
            dense_output=dense_output, sparse_output=sparse_output,
            dense_score=ruler_score(dense_output, sample.answers), sparse_score=ruler_score(sparse_output, sample.answers),
            dense_new_tokens=dense_new, sparse_new_tokens=sparse_new,
            dense_seconds=dense_seconds - (probe.seconds if probe else 0.0), sparse_seconds=sparse_seconds,
            needle=probe.result().summary() if probe else None,
        ))
        bar.set_postfix(dense=f"{np.mean([r.dense_score for r in records]):.2f}",
                        sparse=f"{np.mean([r.sparse_score for r in records]):.2f}")
    return RulerAccuracy(records, stream.to_dict(), max_new_tokens,
                         settings={"stop_when_answered": stop_when_answered, "needle_threshold": needle_threshold if needles else None})


def _greedy_answer(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "1 pos"],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    decode: Callable[[list[int]], str],
    answers: Sequence[str] | None,
) -> tuple[str, int, float]:
    """(answer text, new tokens, seconds): one prefill under the current TracingConfig, then decode."""
    prompt_length = tokens.shape[1]

    def answered(output: Tensor) -> bool:
        return bool(answers) and ruler_score(decode(output[0, prompt_length:].tolist()), answers) == 1.0

    started = time.perf_counter()
    output = greedy_generate(model.original_model, tokens, max_new_tokens, eos_token_id=eos_token_id, stop=answered)
    seconds = time.perf_counter() - started
    new_tokens = output[0, prompt_length:].tolist()
    if eos_token_id is not None and eos_token_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(eos_token_id)]
    return decode(new_tokens), len(new_tokens), seconds
