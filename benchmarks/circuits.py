"""Circuit tools at long contexts (issue 10): seconds and peak GPU memory per tool and length.

    python benchmarks/circuits.py --shape qwen2.5-1.5b --lengths 131072 1048576 --dense-max 131072 --out $OUT/circuits_qwen.json
    python benchmarks/circuits.py --shape llama-3.1-8b --lengths 131072 524288 --dense-max 131072 --out $OUT/circuits_llama.json
    python benchmarks/circuits.py --device cpu --dtype float32 --layers 2 --lengths 256 \
        --tools forward attribution_patching block_attribution        # smoke test on the CPU

A random-init model of the chosen shape (bf16, default StreamConfig with keep_qk=False, MLPs
chunked over 65536 positions); the metric is a logit difference at the last position, whose
logits alone are built (``positions=[-1]``). Tools (``TOOLS``, name -> function):
- ``forward``: one sparse forward with every layer's ``hook_pattern`` cached;
- ``attribution_patching``: every head (``[layer, head]``), one clean and one corrupted run (the
  first half of the tokens replaced), one checkpointed backward;
- ``block_attribution``: the gate gradient of every kept block of every layer;
- ``path_patch``, ``span_patch``: registered by ``benchmarks/circuits_patching.py`` when present.
With ``--dense-max N`` every tool runs again with ``mode="dense"`` (SDPA attention on the same
weights) up to ``N`` tokens; tools that need sparse attention record their error there.
Per row: seconds, peak GPU GB (``torch.cuda.max_memory_allocated``), or the error (an
out-of-memory row is recorded and the run goes on). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.model import QWEN25_15B  # noqa: E402

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21,
                  rope_theta=500_000.0, tie_word_embeddings=False)
SHAPES = {"qwen2.5-1.5b": QWEN25_15B, "llama-3.1-8b": LLAMA31_8B}


def build(args) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    import sparse_lens as sl

    config_class = Qwen2Config if args.shape == "qwen2.5-1.5b" else LlamaConfig
    config = config_class(**{**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})})
    model = sl.HookedSparseTransformer.from_config(config, sl.StreamConfig(keep_qk=False),
                                                   dtype=getattr(torch, args.dtype), device=args.device)
    model.mlp_chunk_tokens = args.mlp_chunk
    return model


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Logit difference of two fixed tokens at the (only kept) last position."""
    return logits[0, -1, 1].float() - logits[0, -1, 2].float()


# ----- the tools: (model, clean, corrupted, args) -> a small JSON-able summary -----------------------
def bench_forward(model, clean, corrupted, args) -> dict:
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_pattern"),
                                             logits_to_keep=1, use_cache=False)
    return {"metric": float(metric(logits)), "cached_patterns": len(cache)}


def bench_attribution_patching(model, clean, corrupted, args) -> dict:
    from sparse_lens.analysis.attribution_patching import attribution_patching

    result = attribution_patching(model, clean, corrupted, metric, positions=[-1], heads=True,
                                  offload=args.offload, offload_activations=args.offload_activations)
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


def timed(device: str, work: Callable[[], dict]) -> dict:
    """Seconds and peak GPU GB of ``work()``; an error (out of memory included) becomes the row's ``error``."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    try:
        row = {"result": work()}
    except torch.OutOfMemoryError as error:
        row = {"error": f"out of memory: {str(error).splitlines()[0][:160]}"}
    except Exception as error:  # a tool that does not apply (e.g. gates in dense mode): recorded, not fatal
        row = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - started
    return row


def tokens(model, length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    clean = torch.randint(0, model.cfg.d_vocab, (1, length), generator=generator)
    corrupted = clean.clone()
    corrupted[:, : length // 2] = torch.randint(0, model.cfg.d_vocab, (1, length // 2), generator=generator)
    return clean.to(device), corrupted.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (smoke tests)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--dense-max", type=int, default=0, help="also run mode='dense' up to this many tokens")
    parser.add_argument("--offload", action="store_true", help="block checkpoints in host memory")
    parser.add_argument("--offload-activations", action="store_true", help="attribution differences in host memory")
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/circuits.json"))
    args = parser.parse_args()
    model = build(args)
    warm_clean, warm_corrupted = tokens(model, min(args.warmup_length, min(args.lengths)), args.device)
    rows = []
    for mode in ["sparse"] + (["dense"] if args.dense_max else []):
        with model.stream_settings(mode=mode):
            for tool in args.tools:
                timed(args.device, lambda: TOOLS[tool](model, warm_clean, warm_corrupted, args))  # compiles kernels
                for length in args.lengths:
                    if mode == "dense" and length > args.dense_max:
                        continue
                    clean, corrupted = tokens(model, length, args.device)
                    row = {"tool": tool, "mode": mode, "length": length,
                           **timed(args.device, lambda: TOOLS[tool](model, clean, corrupted, args))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "config": vars(args) | {"out": str(args.out)},
              "model": f"random-init {args.shape} shape" + (f", {args.layers} layers" if args.layers else ""),
              "rows": rows, "command": "python benchmarks/circuits.py " + " ".join(os.sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['model']}, {args.dtype}, {result['device']}, offload={args.offload}, "
          f"offload_activations={args.offload_activations}")
    print("| tool | mode | tokens | seconds | peak GPU GB |")
    print("|---|---|---|---|---|")
    for row in rows:
        seconds = row.get("error") or f"{row['seconds']:.2f}"
        print(f"| {row['tool']} | {row['mode']} | {row['length']:,} | {seconds} | {row.get('peak_gpu_gb', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
