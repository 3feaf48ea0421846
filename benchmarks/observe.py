"""Whole-model forward in mode="dense", "sparse" and "observe" at long contexts, in one run.

    python benchmarks/observe.py --lengths 32768 131072 524288 --out benchmarks/results/observe_h200.json

Random-init Qwen2.5-1.5B-shaped HookedSparseTransformer (benchmarks/model.py's config), bf16,
logits for the last position only, every layer's hook_pattern cached (sparse, observe; dense
fires none), keep_qk=False, MLPs chunked. Per length and mode: wall time of one forward (after a
warm-up per mode at a short length), peak GPU memory, and the ratio to the dense forward of the
same run. Observe = dense attention with its lse (torch's fused SDPA kernel) + the estimate +
the kept blocks' dense masses. Target (issue 12): observe <= 1.3x dense from 32k to 1M tokens.
OOM and ContextTooLongError are caught and recorded. Prints a table and writes JSON.
CPU smoke run: --device cpu --dtype float32 --layers 2 --lengths 512 --warmup-length 256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.model import _triton_version, build, sync  # noqa: E402

MODES = ("dense", "sparse", "observe")


def forward(model, length: int, mode: str, device: str, backend: str = "auto") -> dict:
    """One forward at ``length`` tokens in ``mode``: seconds, peak GPU GB, patterns cached."""
    import sparse_lens as sl

    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"length": length, "mode": mode}
    try:
        with torch.no_grad(), model.stream_settings(mode=mode, backend=backend):
            sync(device)
            started = time.perf_counter()
            logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"),
                                                 logits_to_keep=1)
            sync(device)
            row["seconds"] = time.perf_counter() - started
        patterns = [cache[name] for name in cache.keys() if name.endswith("hook_pattern")]
        row["patterns_cached"] = len(patterns)
        if patterns:
            row["recall_mean"] = float(torch.stack([p.recall().float().mean() for p in patterns]).mean())
            row["pruned_fraction"] = sum(p.pruned_fraction() for p in patterns) / len(patterns)
        row["finite"] = bool(torch.isfinite(logits).all())
        del cache, patterns, logits
    except torch.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
    except sl.ContextTooLongError as error:
        row["error"] = f"ContextTooLongError: {error}"
    if device.startswith("cuda"):
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--estimator", default="rescored")
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="kernels: 'reference' is the chunked torch path observe mode ran before issue 12")
    parser.add_argument("--warmup-length", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/observe.json"))
    args = parser.parse_args()
    model = build(args)
    for mode in args.modes:  # compiles the kernels of each mode
        forward(model, args.warmup_length, mode, args.device, args.backend)
    rows = []
    for length in args.lengths:
        for mode in args.modes:
            rows.append(forward(model, length, mode, args.device, args.backend))
            print(json.dumps(rows[-1]), flush=True)
        dense = next((r for r in rows[-len(args.modes):] if r["mode"] == "dense" and "seconds" in r), None)
        for row in rows[-len(args.modes):]:
            if dense and "seconds" in row:
                row["ratio_to_dense"] = row["seconds"] / dense["seconds"]
    result = {"date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "config": vars(args) | {"out": str(args.out)},
              "model": "random-init Qwen2.5-1.5B shape" + ("" if args.layers == 28 else f", {args.layers} layers"),
              "rows": rows, "command": "python benchmarks/observe.py " + " ".join(os.sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['model']}, {args.dtype}, {args.block}-token blocks, top_k={args.top_k}, "
          f"estimator={args.estimator}, backend={args.backend}, {result['device']}")
    print("| tokens | mode | forward s | x dense | peak GPU GB | recall mean | pruned |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['length']:,} | {row['mode']} | {row['error'][:80]} | | | | |")
            continue
        print(f"| {row['length']:,} | {row['mode']} | {row['seconds']:.2f} | {row.get('ratio_to_dense', float('nan')):.2f} | "
              f"{row.get('peak_gpu_gb', float('nan')):.1f} | {row.get('recall_mean', float('nan')):.4f} | "
              f"{row.get('pruned_fraction', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
