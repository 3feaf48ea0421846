"""Path patching and span patching at long contexts (issue 10 items 3 and 4), beside one forward.

    python benchmarks/circuits_patching.py --shape qwen2.5-1.5b --lengths 131072 1048576 --out $OUT/circuits_patching_qwen.json
    python benchmarks/circuits_patching.py --shape llama-3.1-8b --lengths 131072 --out $OUT/circuits_patching_llama.json
    python benchmarks/circuits_patching.py --device cpu --dtype float32 --layers 2 --lengths 512   # smoke test

Per length, on a random-init model of the chosen shape (bf16, default StreamConfig, keep_qk=False,
MLPs chunked over 65536 positions, logits only at the last position):
- ``forward``: one sparse forward;
- ``path_patch``: one sender set (two heads of layer L/2 - 1) -> one receiver set (two heads of
  layer L/2, queries), :func:`sparse_lens.analysis.path_patching.path_patch`;
- ``path_patch_cached``: the same with the whole-sequence cache of every layer (the old tool; only
  up to ``--cached-max`` tokens);
- ``span_patch``: residual stream at layer L/2 over ``--spans`` equal spans, seconds per span and
  its ratio to one forward (target <= 1.2). Each span runs layers L/2 onwards only (the layers
  before it run once, for all spans), so the ratio is about 0.5 plus the partial clean and
  patched-run forwards to layer L/2 shared by the spans (about 1 / ``--spans``);
- with ``--dense``: the forward and path patching again in ``mode="dense"`` (SDPA attention).
Seconds and peak GPU GB per row; an out-of-memory row is recorded, not fatal. Prints a table and
writes JSON. (To merge into ``benchmarks/circuits.py``: ``measure`` returns the rows.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (add_model_flags, add_real_model_flag, clean_and_corrupted, command,  # noqa: E402
                               config, environment, model_from_args, print_table, save_json, timed)


def measure(model, length: int, args) -> list[dict]:
    from sparse_lens.analysis.path_patching import path_patch, path_patch_cached
    from sparse_lens.analysis.span_patching import span_patch

    device, n_layers = args.device, model.cfg.n_layers
    clean, corrupted = clean_and_corrupted(model, length, device, seed=0)
    receiver_layer = max(1, n_layers // 2)
    senders = [(receiver_layer - 1, 0), (receiver_layer - 1, 1)]
    receivers = [(receiver_layer, 0), (receiver_layer, 1)]

    def metric(logits):
        return logits[0, -1, 0].float() - logits[0, -1, 1].float()

    def forward():
        with torch.no_grad():
            return float(metric(model(clean, logits_to_keep=1)))

    def patch(tool):
        return lambda: tool(model, clean, corrupted, senders, receivers, metric, positions=[-1])

    spans = [(start * length // args.spans, (start + 1) * length // args.spans) for start in range(args.spans)]

    def spans_run():
        values = span_patch(model, clean, corrupted, metric, spans, layers=[receiver_layer], positions=[-1], progress=False)
        return values.tolist()

    modes = ["sparse"] + (["dense"] if args.dense else [])
    rows = []
    for mode in modes:
        with model.stream_settings(mode=mode):
            tools = [("forward", forward), ("path_patch", patch(path_patch))]
            if length <= args.cached_max:
                tools.append(("path_patch_cached", patch(path_patch_cached)))
            if mode == "sparse":
                tools.append(("span_patch", spans_run))
            for tool, work in tools:
                timing = timed(device, work, key="value")
                row = {"length": length, "mode": mode, "tool": tool, "seconds": timing.pop("seconds"), **timing}
                if tool == "span_patch" and "error" not in row:
                    row["spans"] = args.spans
                    row["patched_layer"] = receiver_layer
                    forward_seconds = next(r["seconds"] for r in rows if r["tool"] == "forward" and r["mode"] == mode
                                           and "error" not in r)
                    row["seconds_per_span"] = row["seconds"] / args.spans
                    row["per_span_over_forward"] = row["seconds_per_span"] / forward_seconds
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["qwen2.5-1.5b", "llama-3.1-8b"], default="qwen2.5-1.5b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape (smoke tests)")
    parser.add_argument("--spans", type=int, default=8)
    parser.add_argument("--cached-max", type=int, default=131072, help="longest input for path_patch_cached")
    parser.add_argument("--dense", action="store_true", help="also run mode='dense' (SDPA)")
    add_model_flags(parser)
    add_real_model_flag(parser)  # a real checkpoint (e.g. Gemma 3 270M), the shipped prose as input
    parser.add_argument("--warmup-length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/circuits_patching.json"))
    args = parser.parse_args()
    model = model_from_args(args)
    with torch.no_grad():  # compiles the kernels
        model(torch.zeros(1, min(args.warmup_length, max(args.lengths)), dtype=torch.long, device=args.device),
              logits_to_keep=1)
    rows = [row for length in args.lengths for row in measure(model, length, args)]
    result = {**environment(args.device, triton=False),
              "model": args.model or f"random-init {args.shape} shape, {model.cfg.n_layers} layers",
              "config": config(args), "rows": rows, "command": command("circuits_patching.py")}
    save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, default StreamConfig (keep_qk=False), {result['device']}")
    print_table(["tokens", "mode", "tool", "seconds", "peak GPU GB", "per span / forward"], [
        [f"{row['length']:,}", row["mode"], row["tool"], row.get("error") or f"{row['seconds']:.2f}",
         f"{row.get('peak_gpu_gb', float('nan')):.1f}", f"{row.get('per_span_over_forward', float('nan')):.2f}"]
        for row in rows])


if __name__ == "__main__":
    main()
