"""Kernel timings on one GPU: block estimation and block-sparse attention against dense cuDNN SDPA.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h200.json

One layer, bf16, head dim 128, shapes Qwen2.5-1.5B (12 q / 2 kv heads) and Llama-3.1-8B
(32 q / 8 kv heads), T in {32k, 128k, 512k, 1M}, 64-token blocks, top_k in {16, 32}.
Times are CUDA-event medians after warm-up (fewer repeats at long T); dense SDPA is skipped where
the anchors say it takes over a minute. ``--estimators`` times other estimators than Stream
(``estimate_blocks``; only Stream has a Triton kernel, the others run their torch code on the
GPU). Imports no TransformerLens. Prints a table, writes JSON.
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
from benchmarks.common import attention_heads, command, dense_sdpa, save_json, time_cuda  # noqa: E402
from sparse_lens.kernels import block_sparse_attention, estimate_blocks  # noqa: E402

SHAPES = {name: attention_heads(name)[:2] for name in ("qwen2.5-1.5b", "llama-3.1-8b")}  # (q heads, kv heads)
DENSE_LIMIT_SECONDS = 60.0


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_one(shape: str, seq_len: int, top_k: int, block: int, dense_cache: dict, estimator: str = "stream") -> dict:
    q_heads, kv_heads = SHAPES[shape]
    generator = torch.Generator(device="cuda").manual_seed(seq_len)
    make = lambda heads: torch.randn(1, heads, seq_len, 128, device="cuda", dtype=torch.bfloat16, generator=generator)  # noqa: E731
    query, key, value = make(q_heads), make(kv_heads), make(kv_heads)
    repeats = 5 if seq_len <= 131072 else 2
    geometry = dict(query_block=block, key_block=block)
    estimate = lambda: estimate_blocks(query, key, estimator=estimator, top_k=top_k, sink_blocks=1, local_blocks=1,  # noqa: E731
                                       backend="triton", **geometry)
    block_indices = estimate()
    attend = lambda: block_sparse_attention(query, key, value, block_indices, scale=128**-0.5, backend="triton", **geometry)  # noqa: E731
    row = {"shape": shape, "seq_len": seq_len, "top_k": top_k, "estimator": estimator,
           "estimate_s": time_cuda(estimate, repeats), "sparse_attention_s": time_cuda(attend, repeats),
           "estimate_peak_gb": peak_gb(estimate), "sparse_attention_peak_gb": peak_gb(attend)}
    dense_key = (shape, seq_len)
    if dense_key not in dense_cache:
        predicted = dense_cache.get((shape, seq_len // 4), {}).get("dense_s", 0) * 16
        if predicted > DENSE_LIMIT_SECONDS:
            dense_cache[dense_key] = {"dense_s": None, "dense_note": f"skipped: predicted {predicted:.0f} s"}
        else:
            dense_cache[dense_key] = {"dense_s": time_cuda(lambda: dense_sdpa(query, key, value), repeats if seq_len <= 131072 else 1),
                                      "dense_peak_gb": peak_gb(lambda: dense_sdpa(query, key, value))}
    row.update(dense_cache[dense_key])
    if row.get("dense_s"):
        row["estimate_over_dense"] = row["estimate_s"] / row["dense_s"]
        row["sparse_over_dense"] = row["sparse_attention_s"] / row["dense_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--estimators", nargs="+", default=["stream"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    args = parser.parse_args()
    import triton

    rows, dense_cache = [], {}
    for shape in args.shapes:
        for seq_len in args.lengths:
            for top_k in args.top_k:
                for estimator in args.estimators:
                    rows.append(bench_one(shape, seq_len, top_k, args.block, dense_cache, estimator))
                    print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "block": args.block, "rows": rows, "command": command("kernels.py")}
    save_json(args.out, result)
    print(f"\n{result['gpu']}, torch {result['torch']}, triton {result['triton']}, bf16, d_head 128, {args.block}-token blocks")
    print("| shape | T | top_k | estimator | estimate ms | sparse attn ms | dense SDPA ms | est/dense | sparse/dense | est GB | sparse GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = f"{r['dense_s'] * 1e3:.1f}" if r.get("dense_s") else r.get("dense_note", "-")
        ratio = lambda key: f"{r[key] * 100:.2f}%" if key in r else "-"  # noqa: E731
        print(f"| {r['shape']} | {r['seq_len']:,} | {r['top_k']} | {r.get('estimator', 'stream')} | {r['estimate_s'] * 1e3:.2f} | {r['sparse_attention_s'] * 1e3:.2f} | "
              f"{dense} | {ratio('estimate_over_dense')} | {ratio('sparse_over_dense')} | {r['estimate_peak_gb']:.2f} | {r['sparse_attention_peak_gb']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDNN_SDPA_ENABLED", "1")
    main()
