"""Steps 2-4 of the method: vertical scores, receiver heads by kurtosis, sentence salience.

2. **Vertical score** of sentence ``j``: the mean of ``M[i, j]`` over the receiving sentences
   ``i >= j + proximity`` (``proximity = 4``: the upper triangle and the band of the 3 nearest
   earlier sentences are ignored). The last ``proximity`` sentences have no score (NaN).
3. **Receiver heads**: the ``top_heads = 20`` heads with the largest (Fisher, biased, like
   ``scipy.stats.kurtosis`` defaults) kurtosis of their vertical scores over sentences.
4. **Salience** of sentence ``j``: its vertical score averaged over the receiver heads. The
   thought anchors are the most salient sentences.

``thought_anchors`` runs the steps on one pattern per layer (dense, ``"sparse"`` block-mass or
``"sparse_tokens"`` aggregation); ``observe_thought_anchors`` runs the model once in observe mode
first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_lens.analysis.anchors.dense import sentence_attention_dense
from sparse_lens.analysis.anchors.sentences import Sentences, Span, check_sentence_spans
from sparse_lens.analysis.anchors.sparse import accumulate_sentence_attention
from sparse_lens.pattern import BlockSparsePattern

PROXIMITY = 4
TOP_HEADS = 20
METHODS = ("sparse", "sparse_tokens", "dense")


def vertical_scores(matrices: Float[Tensor, "... n n"], proximity: int = PROXIMITY) -> Float[Tensor, "... n"]:
    """Vertical score of each source sentence j: mean of ``M[i, j]`` over ``i >= j + proximity``
    (NaN for the last ``proximity`` sentences, which have no such receiver)."""
    n = matrices.shape[-1]
    receiver = torch.arange(n)[:, None]
    source = torch.arange(n)[None, :]
    mask = (receiver - source >= proximity).to(matrices.device)
    count = mask.sum(0).to(matrices.dtype)
    sums = (matrices * mask).sum(-2)
    return torch.where(count > 0, sums / count.clamp(min=1), torch.full_like(sums, float("nan")))


def vertical_scores_sparse(
    pattern: BlockSparsePattern,
    spans: Sequence[Span],
    *,
    batch: int = 0,
    proximity: int = PROXIMITY,
    token_level: bool = False,
) -> Float[Tensor, "head n"]:
    """``vertical_scores(sentence_attention_sparse(...))`` without the [head, n, n] matrix:
    accumulated from the kept cells, O(kept cells x sentences per block) memory."""
    spans = check_sentence_spans(spans, pattern.seq_len)
    n = len(spans)
    sums = accumulate_sentence_attention(pattern, spans, batch, token_level, proximity)
    count = (n - torch.arange(n) - proximity).clamp(min=0).double()
    return torch.where(count > 0, sums / count.clamp(min=1), float("nan")).float()


def fisher_kurtosis(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Excess (Fisher) kurtosis over the last axis, biased moments, NaNs omitted (as
    ``scipy.stats.kurtosis(..., fisher=True, bias=True, nan_policy="omit")``); NaN for a
    constant or empty row."""
    values = values.double()
    valid = ~torch.isnan(values)
    count = valid.sum(-1).double()
    filled = torch.where(valid, values, 0.0)
    mean = filled.sum(-1) / count.clamp(min=1)
    centred = torch.where(valid, values - mean[..., None], 0.0)
    m2 = (centred**2).sum(-1) / count.clamp(min=1)
    m4 = (centred**4).sum(-1) / count.clamp(min=1)
    kurt = m4 / m2**2 - 3.0
    return torch.where((count > 0) & (m2 > 0), kurt, float("nan")).float()


@dataclass(frozen=True)
class ThoughtAnchors:
    """Receiver heads and sentence salience of one chain of thought.

    Attributes:
        vertical_scores: [layer, head, sentence], NaN for the last ``proximity`` sentences.
        kurtosis: [layer, head], Fisher kurtosis of each head's vertical scores.
        receiver_heads: the ``top_heads`` (layer, head) pairs of largest kurtosis, largest first.
        salience: [sentence], mean vertical score over the receiver heads.
        method: ``"dense"``, ``"sparse"`` or ``"sparse_tokens"``.
        pruned_fraction: for the sparse methods of :func:`thought_anchors`, the patterns'
            pruned fraction (mean over layers; None for patterns sliced along queries, and for
            the other methods).
    """

    vertical_scores: Float[Tensor, "layer head sentence"]
    kurtosis: Float[Tensor, "layer head"]
    receiver_heads: tuple[tuple[int, int], ...]
    salience: Float[Tensor, "sentence"]
    proximity: int = PROXIMITY
    method: str = "sparse"
    pruned_fraction: float | None = None

    @property
    def n_sentences(self) -> int:
        return self.salience.shape[0]

    def anchors(self, k: int = 5) -> list[int]:
        """The ``k`` most salient sentences (indices, most salient first; scored sentences only)."""
        order = torch.argsort(torch.nan_to_num(self.salience, nan=-float("inf")), descending=True)
        n_scored = int((~torch.isnan(self.salience)).sum())  # NaN (unscored) sorts last
        return order[: min(k, n_scored)].tolist()

    def summary(self, sentences: Sequence[str] | None = None, k: int = 5) -> str:
        pruned = "" if self.pruned_fraction is None else f", {self.pruned_fraction:.0%} pruned"
        lines = [f"Thought anchors ({self.method}{pruned}): {self.n_sentences} sentences, top receiver heads "
                 + ", ".join(f"L{layer}H{head}" for layer, head in self.receiver_heads[:8])
                 + (" ..." if len(self.receiver_heads) > 8 else "")]
        for rank, index in enumerate(self.anchors(k), 1):
            text = f" {sentences[index][:80]!r}" if sentences is not None else ""
            lines.append(f"  {rank}. sentence {index} salience {float(self.salience[index]):.4g}{text}")
        return "\n".join(lines)


def anchors_from_vertical_scores(
    scores: Float[Tensor, "layer head sentence"],
    *,
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    method: str = "sparse",
    exclude_layers: Sequence[int] = (),
) -> ThoughtAnchors:
    """Steps 3-4 of the method: receiver heads by kurtosis, salience over them. Heads of
    ``exclude_layers`` are never receivers (some analyses skip layer 0)."""
    kurt = fisher_kurtosis(scores)
    ranking = torch.nan_to_num(kurt.double(), nan=-float("inf")).clone()
    for layer in exclude_layers:
        ranking[layer] = -float("inf")
    n_heads = scores.shape[1]
    order = torch.argsort(ranking.flatten(), descending=True, stable=True)
    order = [int(i) for i in order if ranking.flatten()[i] > -float("inf")][:top_heads]
    receivers = tuple((i // n_heads, i % n_heads) for i in order)
    if receivers:
        salience = torch.stack([scores[layer, head] for layer, head in receivers]).mean(0)
    else:
        salience = torch.full(scores.shape[-1:], float("nan"))
    return ThoughtAnchors(scores, kurt, receivers, salience, proximity, method)


def thought_anchors(
    patterns: Sequence[BlockSparsePattern],
    sentences: Sequence[Span] | Sentences,
    *,
    method: str = "sparse",
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    batch: int = 0,
    exclude_layers: Sequence[int] = (),
) -> ThoughtAnchors:
    """Thought anchors of a chain of thought from one pattern per layer.

    ``method="sparse"`` aggregates the kept blocks' ``block_mass`` only (any mode; in observe
    mode the kept mass is dense mass, in sparse mode the renormalised sparse softmax);
    ``"sparse_tokens"`` the kept cells' exact token weights (``keep_qk=True``). ``method="dense"``
    recomputes exact dense attention from observe-mode patterns with ``keep_qk=True`` (quadratic
    time). The sparse results record the patterns' mean pruned fraction.
    """
    spans = list(sentences)
    pruned = None
    if method in ("sparse", "sparse_tokens"):
        token_level = method == "sparse_tokens"
        scores = [vertical_scores_sparse(p, spans, batch=batch, proximity=proximity, token_level=token_level)
                  for p in patterns]
        if not any(p.is_sliced for p in patterns):
            pruned = sum(p.pruned_fraction() for p in patterns) / len(patterns)
    elif method == "dense":
        scores = [vertical_scores(sentence_attention_dense(p, spans, batch=batch), proximity) for p in patterns]
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    result = anchors_from_vertical_scores(
        torch.stack(scores), top_heads=top_heads, proximity=proximity, method=method, exclude_layers=exclude_layers
    )
    return result if pruned is None else replace(result, pruned_fraction=float(pruned))


@torch.no_grad()
def observe_thought_anchors(
    model: Any,
    tokens: Tensor,
    sentences: Sequence[Span] | Sentences,
    *,
    methods: Sequence[str] = ("sparse", "dense"),
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    **stream_changes: Any,
) -> dict[str, ThoughtAnchors]:
    """One observe-mode run of ``model`` (a ``HookedSparseTransformer``: dense attention, the
    sparse estimate recorded; ``stream_changes`` e.g. ``query_block=16, key_block=16, top_k=16``)
    and its thought anchors by each of ``methods`` (``"sparse"``, ``"sparse_tokens"``, ``"dense"``).
    Compare them with ``compare_anchors(result["sparse"], result["dense"])``."""
    with model.stream_settings(**{**stream_changes, "mode": "observe", "keep_qk": True}):
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    return {method: thought_anchors(patterns, sentences, method=method, top_heads=top_heads, proximity=proximity)
            for method in methods}
