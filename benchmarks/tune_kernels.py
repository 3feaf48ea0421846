"""Launch-parameter sweep of the Triton kernels on one GPU (helps pick the defaults).

    python benchmarks/tune_kernels.py --out benchmarks/results/tune_h200.json

- block-sparse attention forward: num_warps x num_stages, Qwen2.5-1.5B and Llama-3.1-8B shapes,
  128k tokens, top_k 32 (the <= 5%-of-dense target's setting); benchmarks/attention_sweep.py sweeps
  every launch setting of the attention kernels (forward and backward) against dense SDPA;
- Stream estimator: cost against ``representative_keys`` (the keys read per candidate), 128k and 1M.
Uses the kernels' private launch helpers to vary launch parameters without changing defaults.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.kernels import SHAPES, time_cuda
from sparse_lens.kernels import stream_estimate
from sparse_lens.kernels import sparse_attention_triton as attention


def qkv(shape: str, seq_len: int):
    q_heads, kv_heads = SHAPES[shape]
    make = lambda heads: torch.randn(1, heads, seq_len, 128, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    return make(q_heads), make(kv_heads), make(kv_heads)


def attention_forward(query, key, value, block_indices, num_warps: int, num_stages: int, block: int):
    output = torch.empty_like(query)
    lse = torch.empty(query.shape[:3], device="cuda", dtype=torch.float32)
    block_mass = torch.empty(block_indices.shape, device="cuda", dtype=torch.float32)
    launch = attention.KernelLaunch(num_warps=num_warps, num_stages=num_stages)
    return lambda: attention.launch_forward(query, key, value, block_indices, None, output, lse, block_mass,
                                             query_block=block, key_block=block, scale=128**-0.5, launch=launch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune.json"))
    args = parser.parse_args()
    block, rows = 64, []
    for shape in SHAPES:
        query, key, value = qkv(shape, 131072)
        block_indices = stream_estimate(query, key, query_block=block, key_block=block, top_k=32, sink_blocks=1,
                                        local_blocks=1, backend="triton").to(torch.int32).contiguous()
        for num_warps in (4, 8):
            for num_stages in (1, 2, 3, 4):
                seconds = time_cuda(attention_forward(query, key, value, block_indices, num_warps, num_stages, block), 10, 2)
                rows.append({"kernel": "attention_forward", "shape": shape, "seq_len": 131072, "top_k": 32,
                             "num_warps": num_warps, "num_stages": num_stages, "ms": seconds * 1e3})
                print(json.dumps(rows[-1]), flush=True)
    for seq_len in (131072, 1048576):
        query, key, _ = qkv("qwen2.5-1.5b", seq_len)
        for representative_keys in (1, 2, 4, 8, 16):
            estimate = lambda: stream_estimate(query, key, query_block=block, key_block=block, top_k=16, sink_blocks=1,  # noqa: E731
                                               local_blocks=1, representative_keys=representative_keys, backend="triton")
            rows.append({"kernel": "estimator", "shape": "qwen2.5-1.5b", "seq_len": seq_len, "top_k": 16,
                         "representative_keys": representative_keys, "ms": time_cuda(estimate, 5, 1) * 1e3})
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "rows": rows,
              "command": "python benchmarks/tune_kernels.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| kernel | shape | T | setting | ms |\n|---|---|---|---|---|")
    for r in rows:
        setting = f"warps {r['num_warps']}, stages {r['num_stages']}" if "num_warps" in r else f"representative_keys {r['representative_keys']}"
        print(f"| {r['kernel']} | {r['shape']} | {r['seq_len']:,} | {setting} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
