"""Whole-model sparse forward at long contexts: a random-init Qwen2.5-1.5B-shaped
HookedSparseTransformer with every layer's hook_pattern cached.

    python benchmarks/model.py --lengths 131072 524288 1048576 --out benchmarks/results/model_h200.json

Per length: wall time of one forward (after a warm-up at a short length), peak GPU memory, and the
bytes held by the 28 cached patterns. Settings for long inputs: keep_qk=False (patterns keep only
indices, masses and lse), MLPs chunked over 65536 positions, logits for the last position only.
Needs transformer_lens (carry wheels to a GPU machine; see docs/benchmarks.md). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=1 << 21,
                  rope_theta=1_000_000.0, tie_word_embeddings=True)


def build(args):
    from transformers import Qwen2Config

    import sparse_lens as sl

    config = Qwen2Config(**{**QWEN25_15B, "num_hidden_layers": args.layers})
    stream = sl.StreamConfig(query_block=args.block, key_block=args.block, top_k=args.top_k, keep_qk=False,
                             estimator=args.estimator)
    model = sl.HookedSparseTransformer.from_config(config, stream, dtype=getattr(torch, args.dtype), device=args.device)
    model.mlp_chunk_tokens = args.mlp_chunk
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, length: int, device: str) -> dict:
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"),
                                             logits_to_keep=1)
    sync(device)
    seconds = time.perf_counter() - started
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    row = {"length": length, "seconds": seconds, "pattern_bytes": sum(p.nbytes() for p in patterns),
           "pruned_fraction": sum(p.pruned_fraction() for p in patterns) / len(patterns),
           "logits_shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all())}
    if device.startswith("cuda"):
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del cache, patterns, logits
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--estimator", default="rescored")
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-length", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    model = build(args)
    build_seconds = time.perf_counter() - started
    measure(model, args.warmup_length, args.device)  # compiles the kernels
    rows = []
    for length in args.lengths:
        try:
            rows.append(measure(model, length, args.device))
        except torch.OutOfMemoryError as error:
            rows.append({"length": length, "error": f"out of memory: {str(error).splitlines()[0]}"})
        print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "config": vars(args) | {"out": str(args.out)},
              "model": "random-init Qwen2.5-1.5B shape" + ("" if args.layers == 28 else f", {args.layers} layers"),
              "build_seconds": build_seconds, "rows": rows, "command": "python benchmarks/model.py " + " ".join(os.sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['model']}, {args.dtype}, {args.block}-token blocks, top_k={args.top_k}, {result['device']}")
    print("| tokens | forward s | peak GPU GB | cached patterns MB | pruned |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['length']:,} | {row['error']} | | | |")
        else:
            print(f"| {row['length']:,} | {row['seconds']:.2f} | {row.get('peak_gpu_gb', float('nan')):.1f} | "
                  f"{row['pattern_bytes'] / 2**20:.0f} | {row['pruned_fraction']:.4f} |")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    main()
