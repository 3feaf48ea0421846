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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (add_model_flags, add_stream_flags, cached_forward, command, config,  # noqa: E402
                               environment, print_table, save_json, timed)
from benchmarks.model import build, model_name  # noqa: E402

MODES = ("dense", "sparse", "observe")


def forward(model, length: int, mode: str, device: str, backend: str = "auto") -> dict:
    """One forward at ``length`` tokens in ``mode``: seconds, peak GPU GB, patterns cached."""
    import sparse_lens as sl

    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    with model.stream_settings(mode=mode, backend=backend):
        timing = timed(device, lambda: cached_forward(model, tokens),
                       catch=(torch.OutOfMemoryError, sl.ContextTooLongError))
    row = {"length": length, "mode": mode}
    if "error" in timing:
        return row | timing
    logits, patterns = timing.pop("result")
    row |= {"seconds": timing.pop("seconds"), "patterns_cached": len(patterns)}
    if patterns:
        row["recall_mean"] = float(torch.stack([p.recall().float().mean() for p in patterns]).mean())
        row["pruned_fraction"] = sum(p.pruned_fraction() for p in patterns) / len(patterns)
    row["finite"] = bool(torch.isfinite(logits).all())
    del patterns, logits
    return row | timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layers", type=int, default=28)
    add_stream_flags(parser)
    add_model_flags(parser)
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
        dense = next((r for r in rows[-len(args.modes):] if r["mode"] == "dense" and "error" not in r), None)
        for row in rows[-len(args.modes):]:
            if dense and "error" not in row:
                row["ratio_to_dense"] = row["seconds"] / dense["seconds"]
    result = {**environment(args.device), "config": config(args), "model": model_name(args.layers),
              "rows": rows, "command": command("observe.py")}
    save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, {args.block}-token blocks, top_k={args.top_k}, "
          f"estimator={args.estimator}, backend={args.backend}, {result['device']}")
    nan = float("nan")
    print_table(["tokens", "mode", "forward s", "x dense", "peak GPU GB", "recall mean", "pruned"], [
        [f"{row['length']:,}", row["mode"], row["error"][:80], "", "", "", ""] if "error" in row else
        [f"{row['length']:,}", row["mode"], f"{row['seconds']:.2f}", f"{row.get('ratio_to_dense', nan):.2f}",
         f"{row.get('peak_gpu_gb', nan):.1f}", f"{row.get('recall_mean', nan):.4f}",
         f"{row.get('pruned_fraction', nan):.4f}"] for row in rows])


if __name__ == "__main__":
    main()
