"""Block-sparse attention with sliding windows, logit soft-capping and attention sinks: cost against the plain kernel.

    python3 benchmarks/kernels_features.py --out $OUT/kernels_features.json          # one H200: 128k tokens
    python benchmarks/kernels_features.py --device cpu --lengths 512 --heads 2 1 --d-head 16 \
        --window 128 --top-k 4 --out /tmp/kernels_features.json      # CPU smoke run (Triton interpreter, fp32)

One layer with Gemma-like heads (default 32 query / 16 KV heads, head dim 128, as Gemma 2 27B, whose
local layers have window 4096 and every layer soft-cap 50; ``--heads 16 8 --d-head 256`` is Gemma 2
9B), bf16, 64-token blocks, T = 128k. Two block layouts, each timed plain and with the features, in one run:

- ``top_k``: a global layer's budget (sink block, the diagonal and the block before it, the rest
  spread evenly over the past; ``--top-k`` blocks): plain, ``softcap``, ``sinks``, both;
- ``band``: a sliding-window layer keeping its whole window band (``window.window_band``, the
  model side's policy): the same blocks without the token mask (plain), with ``window``, and with
  window + softcap + sinks.

Per row: forward and backward (q, k, v and, with sinks, d sinks) times (CUDA-event medians), TFLOP/s
on the query-key pairs the kernel really computes (4 d flops a pair forward, 10 d backward: the
flash-attention convention; a window's masked pairs are not counted), and the ratio of each time
to the plain kernel on the same layout. Plus the observe path (``dense_attention``) of a windowed
soft-capped layer, which SDPA cannot run, against dense causal SDPA. Prints a table; writes JSON
after every row (a run stopped early keeps what it measured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import command, dense_sdpa, environment, print_table, save_json, time_cuda  # noqa: E402
from sparse_lens.kernels.blocks import num_blocks  # noqa: E402
from sparse_lens.kernels.dispatch import dense_attention  # noqa: E402
from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton  # noqa: E402
from sparse_lens.kernels.window import window_band  # noqa: E402


def measure(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, wall clock on the CPU (after one warm-up)."""
    if device.startswith("cuda"):
        return time_cuda(fn, repeats, warmup=1)
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def top_k_layout(seq_len: int, block: int, top_k: int) -> torch.Tensor:
    """[n_query_blocks, top_k]: block 0, the diagonal and the block before it, the rest evenly spread."""
    rows = []
    for row in range(num_blocks(seq_len, block)):
        chosen = {0, row, max(row - 1, 0)}
        spread = torch.linspace(1, max(row - 2, 1), max(top_k - 3, 1)).round().long().tolist()
        chosen.update(b for b in spread if b < row)
        kept = sorted(chosen)[:top_k]
        rows.append(kept + [-1] * (top_k - len(kept)))
    return torch.tensor(rows)


def computed_pairs(layout: torch.Tensor, seq_len: int, block: int, window: int | None) -> int:
    """Query-key pairs inside the kept blocks that the kernel computes: causal, within ``window`` if any.

    Per query ``t`` and kept block ``[k0, k1]``: ``min(k1, t) - max(k0, t - window + 1) + 1`` keys, if positive.
    """
    queries = torch.arange(layout.shape[0] * block).unflatten(0, (-1, block))  # [n_query_blocks, block]
    first_key = layout.clamp(min=0)[:, :, None] * block  # [n_query_blocks, slots, 1]
    last_key = torch.clamp(first_key + block, max=seq_len) - 1
    low = first_key if window is None else torch.maximum(first_key, queries[:, None, :] - window + 1)
    count = (torch.minimum(last_key, queries[:, None, :]) - low + 1).clamp(min=0)
    real = (queries < seq_len)[:, None, :] & (layout >= 0)[:, :, None]
    return int((count * real).sum())


def time_variant(qkv, sinks, layout, args, features: dict) -> dict:
    query, key, value = qkv
    tensors = [t.detach().requires_grad_() for t in (query, key, value)]
    sink = sinks.detach().requires_grad_() if features.get("sinks") else None
    settings = dict(query_block=args.block, key_block=args.block, scale=args.d_head ** -0.5,
                    window=features.get("window"), softcap=features.get("softcap"), sinks=sink)
    indices = layout.to(query.device).expand(*query.shape[:2], *layout.shape)

    with torch.no_grad():
        forward_s = measure(lambda: block_sparse_attention_triton(query, key, value, indices, **settings),
                            args.device, args.repeats)
    output = block_sparse_attention_triton(*tensors, indices, **settings)[0]
    grad = torch.randn_like(output)
    wanted = tensors + ([sink] if sink is not None else [])
    backward_s = measure(lambda: torch.autograd.grad(output, wanted, grad, retain_graph=True), args.device, args.repeats)
    return {"forward_s": forward_s, "backward_s": backward_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 16], metavar=("Q_HEADS", "KV_HEADS"))
    parser.add_argument("--d-head", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--softcap", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-dense", action="store_true", help="skip the observe-path rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels_features.json"))
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    variants = {
        "top_k": [("plain", {}), ("softcap", {"softcap": args.softcap}), ("sinks", {"sinks": True}),
                  ("softcap+sinks", {"softcap": args.softcap, "sinks": True})],
        "band": [("plain", {}), ("window", {"window": args.window}),
                 ("window+softcap+sinks", {"window": args.window, "softcap": args.softcap, "sinks": True})],
    }
    rows, table = [], []

    def save() -> None:
        save_json(args.out, environment(args.device) | {"command": command("kernels_features.py", "python3"),
                                                        "config": vars(args) | {"out": str(args.out)}, "rows": rows})
    for seq_len in args.lengths:
        generator = torch.Generator().manual_seed(0)
        q_heads, kv_heads = args.heads
        qkv = [torch.randn(1, h, seq_len, args.d_head, generator=generator).to(args.device, dtype)
               for h in (q_heads, kv_heads, kv_heads)]
        sinks = torch.randn(q_heads, generator=generator).to(args.device)
        layouts = {"top_k": top_k_layout(seq_len, args.block, args.top_k),
                   "band": window_band(seq_len, args.block, args.block, args.window)}
        for layout_name, layout in layouts.items():
            plain = None
            for name, features in variants[layout_name]:
                row = dict(seq_len=seq_len, layout=layout_name, slots=layout.shape[1], variant=name,
                           window=features.get("window"), softcap=features.get("softcap"),
                           sinks=bool(features.get("sinks")))
                try:
                    row |= time_variant(qkv, sinks, layout, args, features)
                except torch.OutOfMemoryError as error:
                    row["error"] = f"out of memory: {str(error).splitlines()[0][:160]}"
                    rows.append(row)
                    save()
                    continue
                pairs = computed_pairs(layout, seq_len, args.block, features.get("window")) * q_heads
                row["pairs"] = pairs
                row["forward_tflops"] = 4 * pairs * args.d_head / row["forward_s"] / 1e12
                row["backward_tflops"] = 10 * pairs * args.d_head / row["backward_s"] / 1e12
                plain = plain or row
                row["forward_ratio"] = row["forward_s"] / plain["forward_s"]
                row["backward_ratio"] = row["backward_s"] / plain["backward_s"]
                rows.append(row)
                save()
                table.append([seq_len, layout_name, name, f"{row['forward_s'] * 1e3:.2f}", f"{row['forward_tflops']:.3g}",
                              f"{row['forward_ratio']:.2f}", f"{row['backward_s'] * 1e3:.2f}",
                              f"{row['backward_tflops']:.3g}", f"{row['backward_ratio']:.2f}"])
                print(table[-1], flush=True)
        if not args.no_dense:  # observe path: dense attention of a windowed soft-capped layer vs dense causal SDPA
            query, key, value = qkv
            scale = args.d_head ** -0.5
            observe = dict(window=args.window, softcap=args.softcap)
            for name, fn in [
                ("dense SDPA (causal, no features)", lambda: dense_sdpa(query, key, value)),
                ("dense_attention window+softcap", lambda: dense_attention(query, key, value, scale=scale, **observe)),
                ("dense_attention softcap (global layer)",
                 lambda: dense_attention(query, key, value, scale=scale, softcap=args.softcap)),
            ]:
                row = dict(seq_len=seq_len, layout="dense", variant=name)
                try:
                    row["forward_s"] = measure(fn, args.device, 1)
                except torch.OutOfMemoryError as error:
                    row["error"] = f"out of memory: {str(error).splitlines()[0][:160]}"
                rows.append(row)
                save()
                if "forward_s" in row:
                    table.append([seq_len, "dense", name, f"{row['forward_s'] * 1e3:.2f}", "", "", "", "", ""])
                    print(table[-1], flush=True)
    print_table(["T", "layout", "variant", "fwd ms", "fwd TFLOP/s", "fwd / plain", "bwd ms", "bwd TFLOP/s",
                 "bwd / plain"], table)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
