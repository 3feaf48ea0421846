"""Circuit tools at long contexts (issue 10): seconds and peak GPU memory per tool and length.

    python benchmarks/circuits.py --shape qwen2.5-1.5b --lengths 131072 1048576 --dense-max 131072 --out $OUT/circuits_qwen.json
    python benchmarks/circuits.py --shape llama-3.1-8b --lengths 131072 524288 --dense-max 131072 --out $OUT/circuits_llama.json
    python benchmarks/circuits.py --device cpu --dtype float32 --layers 2 --lengths 256 \
        --tools forward attribution_patching block_attribution        # smoke test on the CPU
    python benchmarks/circuits.py --model /tmp/gemma3_270m --dtype float32 --lengths 32768 --out $OUT/circuits_gemma3.json

A random-init model of the chosen shape (bf16, default StreamConfig with keep_qk=False, MLPs
chunked over 65536 positions), or with ``--model`` a real checkpoint (its weights in ``--dtype``, the
shipped prose as input: ``clean_and_corrupted``); the metric is a logit difference at the last position, whose
logits alone are built (``positions=[-1]``). Tools (``TOOLS``, name -> function):
- ``forward``: one sparse forward with every layer's ``hook_pattern`` cached;
- ``attribution_patching``: every head (``[layer, head]``), one clean and one corrupted run (the
  first half of the tokens replaced), one backward checkpointed by segments of ``--segment-layers``
  blocks (the corrupted run is recomputed segment by segment in the backward);
- ``block_attribution``: the gate gradient of every kept block of every layer;
- ``path_patch``, ``span_patch``: not here; ``benchmarks/circuits_patching.py`` times them beside one forward.
With ``--dense-max N`` every tool runs again with ``mode="dense"`` (SDPA attention on the same
weights) up to ``N`` tokens; tools that need sparse attention record their error there.
Per row: seconds, peak GPU GB (``torch.cuda.max_memory_allocated``), or the error (an
out-of-memory row is recorded and the run goes on), and ``estimated_peak_gb``: the peak predicted
before the run from per-token figures (:func:`estimated_peak_gb`). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (add_model_flags, add_real_model_flag, cached_forward, clean_and_corrupted,  # noqa: E402
                               command, config, environment, model_from_args, print_table, save_json, timed)

SHAPE_NAMES = ["llama-3.1-8b", "qwen2.5-1.5b"]


# Working set of one block's recompute and backward, in residual-stream copies [T, d_model], measured on
# the CPU (tests/tl/test_checkpointing.py: bf16 Qwen2-like block, d_mlp = 6 d_model, MLP chunks of T/16,
# the Triton attention's own buffers): 8.6 with frozen parameters (attribution_patching), 2.1 more
# when parameters need gradients (block_attribution saves the linears' inputs for them).
WORKING_SET_COPIES = {"attribution_patching": 8.6, "block_attribution": 10.7}


def estimated_peak_gb(tool: str, model, length: int, segment_layers: int | str) -> dict | None:
    """The predicted peak GPU memory of ``tool`` at ``length`` tokens: the weights plus, in residual
    copies R = length x d_model x dtype bytes, the stored checkpoints and one block's working set.

    - ``attribution_patching``: clean and corrupted segment inputs (``2 n_segments``), one segment's
      block inputs and corrupted activations (``2 k``), the working set;
    - ``block_attribution``: segment inputs (``n_segments``), one segment's block inputs (``k``), the
      working set (parameters needing gradients).
    """
    if tool not in WORKING_SET_COPIES:
        return None
    n_layers = model.cfg.n_layers
    k = math.ceil(math.sqrt(n_layers)) if segment_layers == "sqrt" else int(segment_layers)
    n_segments = math.ceil(n_layers / k)
    stored = (2 * n_segments + 2 * k) if tool == "attribution_patching" else (n_segments + k)
    parameter = next(model.parameters())
    residual_gb = length * model.cfg.d_model * parameter.element_size() / 2**30
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    copies = stored + WORKING_SET_COPIES[tool]
    return {"estimated_peak_gb": round(weights_gb + copies * residual_gb, 1), "residual_copy_gb": round(residual_gb, 3),
            "estimated_residual_copies": round(copies, 1), "segment_layers": k, "weights_gb": round(weights_gb, 1)}


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Logit difference of two fixed tokens at the (only kept) last position."""
    return logits[0, -1, 1].float() - logits[0, -1, 2].float()


# ----- the tools: (model, clean, corrupted, args) -> a small JSON-able summary -----------------------
def bench_forward(model, clean, corrupted, args) -> dict:
    logits, patterns = cached_forward(model, clean, use_cache=False)
    return {"metric": float(metric(logits)), "cached_patterns": len(patterns)}


def bench_attribution_patching(model, clean, corrupted, args) -> dict:
    from sparse_lens.analysis.attribution_patching import attribution_patching

    result = attribution_patching(model, clean, corrupted, metric, positions=[-1], heads=True,
                                  offload=args.offload, offload_activations=args.offload_activations,
                                  segment_layers=args.segment_layers)
    return {"clean_metric": result.clean_metric, "corrupted_metric": result.corrupted_metric,
            "top_heads": result.top_heads(3)}


def bench_block_attribution(model, clean, corrupted, args) -> dict:
    from sparse_lens.analysis.interventions import block_attribution

    result = block_attribution(model, clean, metric, positions=[-1], offload=args.offload)
    return {"metric": result.metric, "top_blocks": result.top_blocks(3)}


TOOLS: dict[str, Callable[..., dict]] = {
    "forward": bench_forward,
    "attribution_patching": bench_attribution_patching,
    "block_attribution": bench_block_attribution,
    # Path and span patching: bench_path_patch / bench_span_patch (owned by the path-patching
    # work, benchmarks/circuits_patching.py) join here under "path_patch" / "span_patch".
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPE_NAMES, default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (smoke tests)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--dense-max", type=int, default=0, help="also run mode='dense' up to this many tokens")
    parser.add_argument("--offload", action="store_true", help="block checkpoints in host memory")
    parser.add_argument("--offload-activations", action="store_true",
                        help="attribution patching: the corrupted run's segment inputs in host memory")
    parser.add_argument("--segment-layers", type=lambda text: text if text == "sqrt" else int(text), default="sqrt",
                        help="attribution patching: blocks per checkpointed segment (block_attribution: always sqrt)")
    add_model_flags(parser)
    add_real_model_flag(parser)
    parser.add_argument("--warmup-length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/circuits.json"))
    args = parser.parse_args()
    if args.model and args.layers:
        parser.error("--layers applies to the random-init shape, not to --model")
    model = model_from_args(args)
    warm_clean, warm_corrupted = clean_and_corrupted(model, min(args.warmup_length, min(args.lengths)), args.device)
    rows = []
    for mode in ["sparse"] + (["dense"] if args.dense_max else []):
        with model.stream_settings(mode=mode):
            for tool in args.tools:
                # the warm-up compiles the kernels; a tool that does not apply (gates in dense mode) gives an error row
                timed(args.device, lambda: TOOLS[tool](model, warm_clean, warm_corrupted, args), catch=(Exception,))
                for length in args.lengths:
                    if mode == "dense" and length > args.dense_max:
                        continue
                    clean, corrupted = clean_and_corrupted(model, length, args.device)
                    estimate = estimated_peak_gb(tool, model, length, args.segment_layers if tool == "attribution_patching"
                                                 else "sqrt")  # block_attribution: checkpoint_blocks' default
                    if estimate:
                        print(json.dumps({"tool": tool, "length": length, **estimate}), flush=True)
                    row = {"tool": tool, "mode": mode, "length": length, **(estimate or {}),
                           **timed(args.device, lambda: TOOLS[tool](model, clean, corrupted, args), catch=(Exception,))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {**environment(args.device, triton=False), "config": config(args),
              "model": args.model or f"random-init {args.shape} shape" + (f", {args.layers} layers" if args.layers else ""),
              "rows": rows, "command": command("circuits.py")}
    save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, {result['device']}, offload={args.offload}, "
          f"offload_activations={args.offload_activations}")
    print_table(["tool", "mode", "tokens", "seconds", "peak GPU GB", "estimated GB"], [
        [row["tool"], row["mode"], f"{row['length']:,}", row.get("error") or f"{row['seconds']:.2f}",
         f"{row.get('peak_gpu_gb', float('nan')):.1f}", row.get("estimated_peak_gb", "-")] for row in rows])


if __name__ == "__main__":
    main()
