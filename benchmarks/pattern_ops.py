"""Cost of the pattern operations of issue 9 (validation of an edit, BlockMask export) and a check
that FlexAttention on the exported BlockMask computes sparse_lens' block-sparse attention.

    python benchmarks/pattern_ops.py --out $OUT/pattern_ops.json                      # one GPU
    python benchmarks/pattern_ops.py --device cpu --dtype float32 --lengths 512 --heads 4 --kv-heads 2 --block 16 --top-k 4

Per length (one layer, random q/k/v, Stream's selection): seconds of ``normalize_block_indices``
(what an edited pattern goes through at the hook boundary), of ``to_block_mask`` and the bytes of
its tables (or the ContextTooLongError it raises beyond ``--max-bytes``), and, where the mask
exists, ``flex_attention`` (compiled on CUDA, eager elsewhere) against ``block_sparse_attention``:
max abs difference of the outputs and both times. Imports no TransformerLens. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparse_lens.errors import ContextTooLongError
from sparse_lens.kernels import block_sparse_attention, estimate_blocks
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.pattern_edits import normalize_block_indices
from sparse_lens.pattern_flex import DEFAULT_BLOCK_MASK_BYTES


def seconds(fn, device: str, repeats: int = 3) -> float:
    """Median wall seconds of ``fn`` (synchronised on CUDA), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_length(seq_len: int, args: argparse.Namespace) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(seq_len)
    make = lambda heads: torch.randn(1, heads, seq_len, args.head_dim, device=device, dtype=dtype,  # noqa: E731
                                     generator=generator)
    query, key, value = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    scale = args.head_dim**-0.5
    geometry = dict(query_block=args.block, key_block=args.block)
    indices = estimate_blocks(query, key, estimator="stream", top_k=args.top_k, sink_blocks=1, local_blocks=1,
                              scale=scale, **geometry)
    row: dict = {"seq_len": seq_len, "heads": args.heads, "block": args.block, "top_k": args.top_k}
    row["validate_s"] = seconds(lambda: normalize_block_indices(indices, seq_len=seq_len, **geometry), device)
    sparse = lambda: block_sparse_attention(query, key, value, indices, scale=scale, **geometry)  # noqa: E731
    z, lse, mass = sparse()
    pattern = BlockSparsePattern(indices, mass, lse, seq_len, args.block, args.block, scale)
    try:
        row["to_block_mask_s"] = seconds(lambda: pattern.to_block_mask(max_bytes=args.max_bytes), device, repeats=1)
    except ContextTooLongError as error:
        row["to_block_mask"] = f"refused: {error}"[:200]
        return row
    block_mask = pattern.to_block_mask(max_bytes=args.max_bytes)
    row["block_mask_gb"] = sum(t.numel() * t.element_size() for t in (block_mask.kv_indices, block_mask.q_indices)
                               if t is not None) / 2**30
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention) if device == "cuda" else flex_attention
    run_flex = lambda: flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)  # noqa: E731
    try:
        out = run_flex()
    except Exception as error:  # noqa: BLE001 - record why FlexAttention could not run, keep the other rows
        row["flex"] = f"failed: {type(error).__name__}: {error}"[:300]
        return row
    row["flex_max_abs_diff"] = float((out.float() - z.float()).abs().max())
    row["flex_s"] = seconds(run_flex, device)
    row["block_sparse_attention_s"] = seconds(sparse, device)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 1048576])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_BLOCK_MASK_BYTES)
    parser.add_argument("--out", type=Path, default=Path("pattern_ops.json"))
    args = parser.parse_args(argv)
    rows = []
    for seq_len in args.lengths:
        rows.append(bench_length(seq_len, args))
        print(json.dumps(rows[-1]), flush=True)
    columns = ["seq_len", "validate_s", "to_block_mask_s", "block_mask_gb", "flex_max_abs_diff", "flex_s",
               "block_sparse_attention_s"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
