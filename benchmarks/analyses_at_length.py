"""Needle routes, thought anchors and span suppression at long contexts (issue 10, item 5).

    python3 benchmarks/analyses_at_length.py --lengths 131072 1048576 --out $OUT/analyses_at_length.json
    python3 benchmarks/analyses_at_length.py --device cpu --dtype float32 --layers 2 --lengths 512   # smoke run

A random-init Qwen2.5-1.5B-shaped HookedSparseTransformer (the config of benchmarks/model.py),
default ``StreamConfig`` with ``keep_qk=False``, MLPs chunked over ``--mlp-chunk`` positions. Per
length, each analysis is timed on its own with its peak GPU memory (reset before it; the cached
patterns stay resident and count in every later peak):

- ``forward``: one sparse forward with every layer's ``hook_pattern`` cached, logits for the last
  position only;
- ``route``: ``route_to_needle`` from the last position to a planted 32-token span at depth 0.5
  (a random-init model: a scale test, not a finding), from the cached patterns only;
- ``thought_anchors``: sentence salience (``thought_anchors(method="sparse")``, block mass) from
  the cached patterns, with synthetic sentence boundaries every 30-50 tokens;
- ``suppress_span``: the planted span suppressed in every layer and head, KL of the next-token
  distribution at ``--kl-positions`` positions at the end only (``positions=``, if this version of
  ``suppress_span`` has it; otherwise every position after the span, whose logits may not fit).

An out-of-memory error is caught and recorded with the seconds it took to hit it; the next
analysis still runs. Prints a table and writes JSON (after every row, so a run cut short keeps
what it measured).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_model, cached_forward, command, config, environment, save_json  # noqa: E402
from benchmarks.common import timed as timed_row  # noqa: E402
from benchmarks.model import model_name  # noqa: E402

NEEDLE_TOKENS = 32


def synthetic_sentences(length: int, seed: int = 0) -> list[tuple[int, int]]:
    """Consecutive spans of 30-50 tokens covering ``[0, length)`` (the last may be shorter)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(30, 51, (length // 30 + 1,), generator=generator).tolist()
    spans, start = [], 0
    for size in sizes:
        if start >= length:
            break
        spans.append((start, min(start + size, length)))
        start += size
    return spans


def timed(name: str, length: int, device: str, work) -> tuple[dict, object]:
    """Run ``work()``: its row (seconds and peak GPU GB, or the out-of-memory error and the
    ``seconds_to_oom``; on CUDA the memory resident before it) and its value (None on error)."""
    gc.collect()
    row: dict = {"length": length, "analysis": name}
    if device.startswith("cuda"):
        row["resident_gpu_gb"] = torch.cuda.memory_allocated() / 2**30
    timing = timed_row(device, work)
    result, seconds = timing.pop("result", None), timing.pop("seconds")
    row["seconds_to_oom" if "error" in timing else "seconds"] = seconds
    return row | timing, result


def measure(model, length: int, args) -> list[dict]:
    from sparse_lens.analysis.interventions import suppress_span
    from sparse_lens.analysis.routes import route_to_needle
    from sparse_lens.analysis.thought_anchors import thought_anchors

    device = args.device
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device,
                           generator=torch.Generator(device=device).manual_seed(length))
    needle_start = length // 2
    needle = (needle_start, min(needle_start + NEEDLE_TOKENS, length - 1))
    rows = []

    row, patterns = timed("forward", length, device, lambda: cached_forward(model, tokens)[1])
    if patterns is not None:
        row["pattern_mb"] = sum(p.nbytes() for p in patterns) / 2**20
    rows.append(row)
    report(row)
    if patterns is None:
        return rows

    row, route = timed("route", length, device, lambda: route_to_needle(patterns, needle, answer_position=-1))
    if route is not None:
        entry = route.best_entry
        row.update(best_log_mass=route.best.log_score if route.best else None,
                   needle_log_mass=entry.log_score if entry else None,
                   needle_entry_layer=entry.entry_layer if entry else None, n_entry_layers=len(route.needle_entries))
    rows.append(row)
    report(row)
    del route

    sentences = synthetic_sentences(length)
    row, anchors = timed("thought_anchors", length, device,
                         lambda: thought_anchors(patterns, sentences, method="sparse"))
    row["n_sentences"] = len(sentences)
    if anchors is not None:
        row["top_anchors"] = anchors.anchors(3)
    rows.append(row)
    report(row)
    del anchors, patterns
    gc.collect()

    lean = "positions" in inspect.signature(suppress_span).parameters
    positions = list(range(length - args.kl_positions, length))
    options = {"positions": positions} if lean else {}
    row, suppression = timed("suppress_span", length, device, lambda: suppress_span(model, tokens, needle, **options))
    row["kl_positions"] = len(positions) if lean else length - needle[1]
    row["lean_positions_option"] = lean
    if suppression is not None:
        row.update(mean_kl=suppression.mean_kl, blocks_removed=suppression.blocks_removed)
    rows.append(row)
    report(row)
    return rows


def report(row: dict) -> None:
    print(json.dumps(row), flush=True)


def table(rows: list[dict]) -> str:
    lines = ["| tokens | analysis | seconds | peak GPU GB | note |", "|---|---|---|---|---|"]
    for row in rows:
        peak = f"{row['peak_gpu_gb']:.1f}" if "peak_gpu_gb" in row else "-"
        if "error" in row:
            lines.append(f"| {row['length']:,} | {row['analysis']} | OOM after {row['seconds_to_oom']:.2f} | {peak} | "
                         f"{row['error'][:80]} |")
            continue
        note = {
            "forward": lambda: f"{row.get('pattern_mb', 0):.1f} MB of cached patterns",
            "route": lambda: f"best {row['best_log_mass']:.2f}, needle {row['needle_log_mass']:.2f} (log-mass)"
            if row.get("needle_log_mass") is not None else "no route reads the planted span",
            "thought_anchors": lambda: f"{row['n_sentences']:,} sentences",
            "suppress_span": lambda: f"KL at {row['kl_positions']:,} positions, mean {row.get('mean_kl', 0):.3g}",
        }[row["analysis"]]()
        lines.append(f"| {row['length']:,} | {row['analysis']} | {row['seconds']:.2f} | {peak} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--kl-positions", type=int, default=4,
                        help="positions at the end where suppress_span's KL is read")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-length", type=int, default=8192, help="a first forward compiling the kernels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/analyses_at_length.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    model = build_model("qwen2.5-1.5b", layers=args.layers, dtype=args.dtype, device=args.device,
                        mlp_chunk=args.mlp_chunk)
    build_seconds = time.perf_counter() - started
    with torch.no_grad():
        model(torch.zeros(1, min(args.warmup_length, min(args.lengths)), dtype=torch.long, device=args.device))
    result = {**environment(args.device), "config": config(args), "stream": model.stream.to_dict(),
              "model": model_name(args.layers), "build_seconds": build_seconds, "rows": [],
              "command": command("analyses_at_length.py", python="python3")}
    for length in args.lengths:
        result["rows"] += measure(model, length, args)
        save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, default StreamConfig (keep_qk=False), {result['device']}")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
