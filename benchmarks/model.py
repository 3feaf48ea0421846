"""Whole-model sparse forward at long contexts: a random-init Qwen2.5-1.5B-shaped
HookedSparseTransformer with every layer's hook_pattern cached.

    python benchmarks/model.py --lengths 131072 524288 1048576 --out benchmarks/results/model_h200.json

Per length: wall time of one forward (after a warm-up at a short length), peak GPU memory, and the
bytes held by the 28 cached patterns. Settings for long inputs: keep_qk=False (patterns keep only
indices, masses and lse), MLPs chunked over 65536 positions, logits for the last position only.
Needs transformer_lens (carry wheels to a GPU machine; see docs/benchmarks.md). Prints a table and
writes JSON. ``--profile N``: one more forward at the last length under ``torch.profiler``, and the
``N`` GPU kernels (and copies) taking the most device time, with their share of the summed kernel
time and that sum against the wall time (where the rest of the time goes: launch gaps, host work).
Files written before 2026-12-01 also list ops (``aten::mm``) beside their kernels, so their totals
count those kernels twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (QWEN25_15B, add_model_flags, add_stream_flags, build_model,  # noqa: E402
                               cached_forward, command, config, device_profile, environment, estimator_settings,
                               print_table, save_json, timed)


def build(args):
    """The Qwen2.5-1.5B shape with ``--layers`` layers, ``--block`` / ``--top-k`` / ``--estimator`` /
    ``--settings`` (``keep_qk=False``), ``--dtype``, ``--device``, ``--mlp-chunk`` (also used by observe.py
    and fidelity_at_length.py)."""
    import sparse_lens as sl

    stream = sl.TracingConfig(query_block=args.block, key_block=args.block, top_k=args.top_k, keep_qk=False,
                              estimator=args.estimator,
                              estimator_settings=estimator_settings(args.estimator, getattr(args, "settings", [])))
    return build_model("qwen2.5-1.5b", layers=args.layers, stream=stream, dtype=args.dtype, device=args.device,
                       mlp_chunk=args.mlp_chunk)


def model_name(layers: int) -> str:
    return "random-init Qwen2.5-1.5B shape" + ("" if layers == QWEN25_15B["num_hidden_layers"] else f", {layers} layers")


def measure(model, length: int, device: str) -> dict:
    """One forward of ``length`` random tokens: seconds, peak GPU GB, cached patterns' bytes and pruned
    fraction; out of memory becomes the row's ``error``."""
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    timing = timed(device, lambda: cached_forward(model, tokens))
    if "error" in timing:
        return {"length": length, **timing}
    logits, patterns = timing.pop("result")
    row = {"length": length, "seconds": timing.pop("seconds"), "pattern_bytes": sum(p.nbytes() for p in patterns),
           "pruned_fraction": sum(p.pruned_fraction() for p in patterns) / len(patterns),
           "logits_shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()), **timing}
    del patterns, logits
    return row


def profile(model, length: int, device: str, top: int) -> dict:
    """One forward of ``length`` tokens under ``torch.profiler`` (``device_profile``): the ``top``
    kernels by device time and the totals."""
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    found = device_profile(lambda: cached_forward(model, tokens), device, top)
    return {"length": length} | found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--layers", type=int, default=28)
    add_stream_flags(parser)
    add_model_flags(parser)
    parser.add_argument("--warmup-length", type=int, default=8192)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more forward at the last length; keep the N costliest kernels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    model = build(args)
    build_seconds = time.perf_counter() - started
    measure(model, args.warmup_length, args.device)  # compiles the kernels
    rows = []
    for length in args.lengths:
        rows.append(measure(model, length, args.device))
        print(json.dumps(rows[-1]), flush=True)
    result = {**environment(args.device), "config": config(args), "model": model_name(args.layers),
              "build_seconds": build_seconds, "rows": rows, "command": command("model.py")}
    if args.profile:
        result["profile"] = profile(model, args.lengths[-1], args.device, args.profile)
    save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, {args.block}-token blocks, top_k={args.top_k}, {result['device']}")
    print_table(["tokens", "forward s", "peak GPU GB", "cached patterns MB", "pruned"], [
        [f"{row['length']:,}", row["error"], "", "", ""] if "error" in row else
        [f"{row['length']:,}", f"{row['seconds']:.2f}", f"{row.get('peak_gpu_gb', float('nan')):.1f}",
         f"{row['pattern_bytes'] / 2**20:.0f}", f"{row['pruned_fraction']:.4f}"] for row in rows])
    if args.profile:
        found = result["profile"]
        print(f"\nprofiled forward at {found['length']:,} tokens: {found['wall_s_profiled']:.2f} s wall, "
              f"{found['device_ms_total'] / 1e3:.2f} s of device time")
        print_table(["kernel / op", "calls", "device ms", "share"], [
            [row["name"], row["calls"], f"{row['device_ms']:.1f}", f"{100 * row['share']:.1f}%"] for row in found["top"]])


if __name__ == "__main__":
    main()
