"""``sparse-lens fidelity``: how true is a sparse configuration to the model, on one model and length.

1. ``sl.fidelity`` on a RULER sample (``--task``) of ``--length`` tokens: pruned share, mass
   recall against dense attention, oracle ratio, next-token KL and top-1 agreement;
2. needle fidelity on the same dense run: for the last prompt token, per layer and head, the dense
   mass on each needle and whether the estimator keeps a needle block (target: every head with
   >= ``--threshold`` of its mass on the needle keeps it);
3. with ``--ruler N``: RULER accuracy of the model run sparsely against the same model run densely
   on N samples (tasks cycled from ``--ruler-tasks``), with needle fidelity of each sample.

Prints a summary and writes everything (per-head figures and every answer included) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from sparse_lens.analysis import (
    collect_dense,
    fidelity,
    needle_fidelity,
    ruler_accuracy,
    ruler_samples,
)
from sparse_lens.analysis.task_accuracy import DEFAULT_TASKS
from sparse_lens.cli.config_flags import add_tracing_flags, tracing_config
from sparse_lens.cli.paths import file_in_the_way
from sparse_lens.config import TracingConfig
from sparse_lens.data import RULER_TASKS, make_sample
from sparse_lens.errors import InvalidConfigError
from sparse_lens.tl import DEFAULT_MODEL, HookedSparseTransformer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, GGUF path, HF directory or hub id")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sample (prompt + --max-new-tokens)")
    parser.add_argument("--out", type=Path, default=Path("fidelity.json"), help="JSON file to write")
    add_tracing_flags(parser)
    parser.add_argument("--task", choices=sorted(RULER_TASKS), default="niah_single_1",
                        help="RULER task of the sample scored by fidelity and needle fidelity")
    parser.add_argument("--depth", type=float, default=None, help="needle depth 0..1 (default: drawn from the seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.10, help="dense needle mass that makes a needle head")
    parser.add_argument("--ruler", type=int, default=0, metavar="N", help="RULER samples answered densely and sparsely")
    parser.add_argument("--ruler-tasks", nargs="+", choices=sorted(RULER_TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer budget of --ruler samples")
    parser.add_argument("--no-fidelity", action="store_true",
                        help="skip sl.fidelity (a quadratic observe-mode run); needle fidelity then runs on a dense forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The config the flags describe is valid and ``--out`` can be written as a file, before the
    model loads (else a usage error)."""
    if args.out.is_dir():
        parser.error(f"argument --out: {args.out} is a directory; name the JSON file to write")
    blocking = file_in_the_way(args.out.parent)
    if blocking is not None:
        parser.error(f"argument --out: {args.out} cannot be written: {blocking} is a file, not a directory")
    try:
        fidelity_config(args)
    except InvalidConfigError as error:
        parser.error(f"the sparse attention settings: {error}")


def fidelity_config(args: argparse.Namespace) -> TracingConfig:
    """The TracingConfig scored: every generated flag's value, the estimator's settings flags
    given, and the fields the command fixes (sparse mode, no queries and keys kept)."""
    return tracing_config(args)


def load_model(name: str, stream: TracingConfig, device: str) -> HookedSparseTransformer:
    if str(name) == DEFAULT_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model needs no hub
    return HookedSparseTransformer.from_pretrained(name, stream=stream, device=device)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    stream = fidelity_config(args)
    steps = 4 if args.ruler else 3
    print(f"[1/{steps}] loading {args.model}", flush=True)
    model = load_model(args.model, stream, args.device)
    sample = make_sample(args.task, model.tokenizer, args.length, seed=args.seed, depth=args.depth,
                         answer_tokens=args.max_new_tokens)
    tokens = torch.tensor([sample.input_ids], device=args.device)
    if stream.top_k >= -(-sample.length // stream.key_block):  # every figure would read "exact"
        print(f"warning: top_k {stream.top_k} keeps every one of the prompt's {-(-sample.length // stream.key_block)} "
              "key blocks, so nothing is pruned; use a longer --length, smaller blocks or a smaller --top-k",
              file=sys.stderr, flush=True)

    report, dense, fidelity_started = None, None, time.perf_counter()
    if args.no_fidelity:
        print(f"[2/{steps}] fidelity skipped (--no-fidelity)", flush=True)
    else:
        print(f"[2/{steps}] fidelity against dense attention ({args.task}, {sample.length} tokens)", flush=True)
        dense = collect_dense(model, tokens)
        report = fidelity(model, tokens, stream, dense=dense, verbose=True)
    fidelity_seconds = time.perf_counter() - fidelity_started

    print(f"[3/{steps}] needle fidelity at the answer position", flush=True)
    needle_started = time.perf_counter()
    needle = needle_fidelity(model, sample, stream=stream, threshold=args.threshold, dense=dense)
    needle_seconds = time.perf_counter() - needle_started
    del dense

    ruler = None
    if args.ruler:
        print(f"[4/{steps}] RULER accuracy, dense and sparse, on {args.ruler} samples", flush=True)
        per_task = -(-args.ruler // len(args.ruler_tasks))
        samples = ruler_samples(model.tokenizer, args.length, args.ruler_tasks, per_task, seed=args.seed,
                                answer_tokens=args.max_new_tokens)[: args.ruler]
        ruler = ruler_accuracy(model, samples, stream, max_new_tokens=args.max_new_tokens, needles=True,
                               needle_threshold=args.threshold)

    result = {
        "model": str(args.model),
        "task": args.task,
        "length": sample.length,
        "stream": stream.to_dict(),
        "fidelity": report,
        "fidelity_seconds": round(fidelity_seconds, 2),
        "needle": needle.to_dict(),
        "needle_seconds": round(needle_seconds, 2),
        "ruler": ruler.to_dict() if ruler else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    summary = {**result, "needle": needle.summary(), "ruler": ruler.summary() if ruler else None}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return result
