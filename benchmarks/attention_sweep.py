"""Launch-setting sweep of the block-sparse attention kernels (forward and backward) against dense SDPA.

    . benchmarks/gpu_env.sh && python3 benchmarks/attention_sweep.py --out $OUT/attention_sweep.json   # H200
    python benchmarks/attention_sweep.py --device cpu --lengths 256 --shape tiny --forward w=4 w=4:skip=0 \
        --backward w=4 w=4:kv=8 --other-forward w=4:qt=128 --other-backward w=4 \
        --out /tmp/attention_sweep.json                 # CPU smoke run (Triton interpreter, wall clock)

One layer, random q / k / v (bf16 on the GPU, fp32 on the CPU), head dim 128, Qwen2.5-1.5B heads
(12 query / 2 key-value), ``top_k`` 16 blocks from Stream (sink 1, local: the query block's key
blocks), T = 128k and 1M; geometries (query block x key block) 64x64, the target's, and 128x64,
FlexAttention's (its 380-436 TFLOP/s anchor): 64-token key blocks kept per 128 queries, with fewer
variants (``--other-forward`` / ``--other-backward``). Every variant is a ``KernelLaunch`` of
``sparse_attention_triton``, written
``w=<num_warps>:s=<num_stages>:skip=<0|1>:m=<mask_all 0|1>:qt=<query tile>:kt=<key tile>:kv=<kv_chunk>``
``:h=<0|1>:e=<0|1>:dq=<0|1>`` (unnamed settings keep ``KernelLaunch``'s defaults; ``kv`` acts on the
backward only: dk / dv by a second kernel over chunks of ``kv`` slots per key block, ``dq=1`` there
also dq and d gate (fp32 atomics; FlashAttention-2's backward); ``h=1``: GQA
heads side by side in the grid; ``e=1``: L2 eviction hints; ``mass=0``: the forward without
block masses). At the lengths after
the first, only the first spec and the ``--keep`` - 1 fastest of the first length run (compiling
every variant once keeps the sweep within its budget). Each
row gives the time (CUDA-event median), TFLOP/s effective (FLOPs on the kept causal query-key
pairs: 4 d a pair forward, 10 d backward, as benchmarks/kernels_features.py and rescore.py count
them), for the forward the rate at which it reads key/value tiles (each reached slot's key block,
k and v, once per query tile: 64 FLOPs per byte at 64x64 blocks and d 128, so HBM's 4.8 TB/s
caps a forward whose tiles miss L2 near 300 TFLOP/s), the ratio to the first variant (the launch
that was the default before the sweeps: ``KernelLaunch()``, 4 warps, branching, every tile
masked; the kernels' defaults now are the second specs), and the largest difference of its
results from the first variant's (output and lse forward; dq, dk, dv backward): a launch setting
must not change results beyond rounding. The
backward times the kernel launch(es) with the fp32 dk / dv buffers zeroed (as the autograd path
does). Dense causal SDPA (cuDNN, flash fallback; GQA) runs on the same tensors in the same run,
forward and backward, each skipped where predicted above ``--dense-limit`` seconds from the
previous length (x (T'/T)^2). Variants stop being started once ``--budget`` seconds have passed
(their rows say so). ``--profile N``: one more call of each variant under ``torch.profiler``, its
``N`` costliest kernels (``common.device_profile``). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    attention_heads, command, dense_sdpa, device_profile, environment, print_table, save_json, time_cuda,
)
from sparse_lens.kernels.blocks import kept_pairs_per_slot  # noqa: E402
from sparse_lens.kernels.dispatch import stream_estimate  # noqa: E402
from sparse_lens.kernels.sparse_attention_triton import KernelLaunch, launch_backward, launch_forward  # noqa: E402

SHAPES = {"qwen2.5-1.5b": attention_heads("qwen2.5-1.5b"), "llama-3.1-8b": attention_heads("llama-3.1-8b"),
          "tiny": (2, 1, 32)}  # (query heads, key/value heads, head dim)
# Chosen from the first H200 sweep (benchmarks/results/h200x2_2026-11-30c/attention_sweep.json): at 64x64
# the branch-free loop at 4 warps and 3 stages led (392 TFLOP/s at 128k; 8 warps 178-247, 4 stages 269, 2
# stages 336); 8 warps led the backward (4 spill registers on sm_90).
DEFAULT_FORWARD = ["w=4:skip=1:m=1", "w=4:skip=0:m=0", "w=4:skip=0:m=0:mass=0", "w=4:skip=0:m=0:h=1",
                   "w=4:skip=0:m=0:e=1", "w=4:skip=0:m=0:mass=0:e=1", "w=4:skip=0:m=0:h=1:e=1",
                   "w=4:skip=0:m=0:mass=0:h=1", "w=4:s=4:kt=32:skip=0:m=0", "w=4:skip=0"]
# The key/value kernel holds 140 KB of shared memory at 3 stages (one program per SM), 107 KB at 2.
DEFAULT_BACKWARD = ["w=4:skip=1:m=1", "w=8:skip=0:m=0:h=1", "w=8:skip=0:m=0", "w=8:skip=0:m=0:h=1:e=1",
                    "w=8:skip=0:m=0:kv=32", "w=8:s=2:skip=0:m=0:kv=32", "w=8:skip=0:m=0:kv=32:h=1",
                    "w=8:s=2:skip=0:m=0:kv=64:e=1"]
OTHER_FORWARD = ["w=4:skip=0:m=0", "w=8:qt=128:skip=0:m=0", "w=8:qt=128:skip=0:m=0:e=1"]
OTHER_BACKWARD = ["w=8:skip=0:m=0", "w=8:s=2:skip=0:m=0:kv=32"]
SPEC_FIELDS = {"w": "num_warps", "s": "num_stages", "skip": "skip_unreached", "m": "mask_all", "qt": "query_tile",
               "kt": "key_tile", "kv": "kv_chunk", "h": "heads_inner", "e": "l2_hints", "dq": "dq_atomics"}
SINK, LOCAL = 1, 1


def parse_launch(spec: str) -> tuple[KernelLaunch, bool]:
    """``"w=8:s=2:skip=0:mass=0"`` -> (KernelLaunch(num_warps=8, num_stages=2, skip_unreached=False), False):
    the launch and ``with_mass``."""
    settings, with_mass = {}, True
    for option in spec.split(":"):
        name, _, value = option.partition("=")
        if name == "mass":
            with_mass = value == "1"
        elif name in SPEC_FIELDS and value.isdigit():
            settings[SPEC_FIELDS[name]] = bool(int(value)) if name in ("skip", "m", "h", "e", "dq") else int(value)
        else:
            raise SystemExit(f"bad launch spec {spec!r}: options w, s, skip, m, qt, kt, kv, h, e, dq, mass "
                             "(e.g. w=8:skip=0)")
    return KernelLaunch(**settings), with_mass


def make_timer(device: str):
    """``timer(fn, repeats, warmup) -> median seconds``: CUDA events, or one wall-clock run on the CPU (smoke)."""
    if device == "cuda":
        return time_cuda

    def wall(fn, repeats, warmup=0):
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return wall


def largest_difference(results: tuple, reference: tuple) -> float:
    return max(float((a.float() - b.float()).abs().nan_to_num(float("inf")).max()) for a, b in zip(results, reference))


def random_qkv(shape: str, seq_len: int, device: str) -> tuple:
    """Random q, k, v [1, heads, seq_len, d_head]: bf16 on the GPU, fp32 on the CPU."""
    q_heads, kv_heads, d_head = SHAPES[shape]
    generator = torch.Generator(device=device).manual_seed(seq_len)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda heads: torch.randn(1, heads, seq_len, d_head, device=device, dtype=dtype,  # noqa: E731
                                     generator=generator)
    return make(q_heads), make(kv_heads), make(kv_heads)


class Problem:
    """One length and geometry: tensors, Stream blocks, kept pairs, the forward / backward runners."""

    def __init__(self, qkv: tuple, top_k: int, query_block: int, key_block: int):
        self.query, self.key, self.value = qkv
        seq_len, self.d_head = self.query.shape[2:]
        device, dtype = self.query.device, self.query.dtype
        self.blocks = dict(query_block=query_block, key_block=key_block, scale=self.d_head**-0.5)
        self.block_indices = stream_estimate(
            self.query, self.key, query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=SINK,
            local_blocks=max(LOCAL, query_block // key_block), backend="triton").to(torch.int32).contiguous()
        self.pairs = int(kept_pairs_per_slot(self.block_indices, seq_len, query_block, key_block).sum())
        n_query_blocks = self.block_indices.shape[2]
        last_query = (torch.arange(n_query_blocks, device=device)[:, None] + 1) * query_block - 1
        reached = (self.block_indices >= 0) & (self.block_indices * key_block <= last_query)
        # Key/value bytes a forward with whole-block query tiles reads (x query tiles per block otherwise).
        self.kv_bytes = int(reached.sum()) * key_block * 2 * self.d_head * self.key.element_size()
        self.output = torch.empty_like(self.query)
        self.lse = self.query.new_empty(self.query.shape[:3], dtype=torch.float32)
        self.block_mass = torch.empty(self.block_indices.shape, device=device, dtype=torch.float32)
        self.grad_output = torch.randn(self.query.shape, device=device, generator=torch.Generator(device=device)
                                       .manual_seed(seq_len + 1)).to(dtype)
        self.grad_query = torch.empty_like(self.query)
        self.grad_key = torch.empty_like(self.key, dtype=torch.float32)
        self.grad_value = torch.empty_like(self.value, dtype=torch.float32)

    def forward(self, launch: KernelLaunch, with_mass: bool):
        launch_forward(self.query, self.key, self.value, self.block_indices, None, self.output, self.lse,
                        self.block_mass, with_mass=with_mass, launch=launch, **self.blocks)

    def backward(self, launch: KernelLaunch):
        self.grad_key.zero_(), self.grad_value.zero_()
        launch_backward(self.query, self.key, self.value, self.block_indices, None, self.output, self.grad_output,
                         self.lse, self.grad_query, self.grad_key, self.grad_value, None, launch=launch, **self.blocks)


def dense_rows(qkv: tuple, measured: dict, args, timer) -> list[dict]:
    """Dense causal SDPA forward and backward on ``qkv``; each is skipped where the time ``measured``
    at a shorter length, x (T'/T)^2, passes ``--dense-limit``."""
    batch, q_heads, seq_len, d_head = qkv[0].shape
    pairs = q_heads * seq_len * (seq_len + 1) // 2
    inputs = [tensor.detach().clone().requires_grad_() for tensor in qkv]
    grad_output = torch.randn_like(qkv[0])
    long = seq_len > 131072
    rows, repeats, warmup = [], 1 if long else args.repeats, 1
    for direction, flops in (("forward", 4), ("backward", 10)):
        row = {"kernel": "dense_sdpa", "direction": direction, "seq_len": seq_len, "pairs": pairs}
        if direction in measured:
            shorter, seconds = measured[direction]
            predicted = seconds * (seq_len / shorter) ** 2
            if predicted > args.dense_limit:
                rows.append(row | {"note": f"skipped: predicted {predicted:.0f} s"})
                continue
        if direction == "forward":
            seconds = timer(lambda: dense_sdpa(*inputs), repeats, warmup)
        else:
            output = dense_sdpa(*inputs)
            seconds = timer(lambda: torch.autograd.grad(output, inputs, grad_output, retain_graph=True),
                            repeats, warmup)
            del output
        measured[direction] = (seq_len, seconds)
        rows.append(row | {"s": seconds, "tflops": flops * pairs * d_head / seconds / 1e12})
        print(rows[-1], flush=True)
    return rows


def fastest(rows: list[dict], direction: str, specs: list[str], keep: int) -> list[str]:
    """The first spec and the ``keep - 1`` fastest others of ``rows`` (one length and geometry's)."""
    timed = sorted((r["s"], r["variant"]) for r in rows if r["kernel"] == "block_sparse"
                   and r["direction"] == direction and "s" in r and r["variant"] != specs[0])
    return specs[:1] + [spec for _, spec in timed[:keep - 1]]


def sweep_length(qkv: tuple, geometry: str, args, timer, started: float, specs: dict) -> list[dict]:
    """The block-sparse rows of one length and geometry (``"64x64"``: query block x key block)."""
    query_block, key_block = (int(size) for size in geometry.split("x"))
    problem = Problem(qkv, args.top_k, query_block, key_block)
    seq_len = qkv[0].shape[2]
    base = {"shape": args.shape, "seq_len": seq_len, "geometry": geometry, "top_k": args.top_k, "pairs": problem.pairs}
    rows, repeats = [], args.repeats if seq_len <= 131072 else max(2, args.repeats // 3)
    reference = {}
    for direction in ("forward", "backward"):
        if direction == "backward":  # the first forward's output and lse feed every backward variant
            problem.forward(*parse_launch(args.forward[0]))
        for spec in specs[direction]:
            row = base | {"kernel": "block_sparse", "direction": direction, "variant": spec}
            if time.perf_counter() - started > args.budget:
                rows.append(row | {"note": f"skipped: past the {args.budget:.0f} s budget"})
                continue
            launch, with_mass = parse_launch(spec)
            run = (lambda: problem.forward(launch, with_mass)) if direction == "forward" else (
                lambda: problem.backward(launch))
            try:
                compile_started = time.perf_counter()
                run()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - compile_started
                results = (problem.output, problem.lse) if direction == "forward" else (
                    problem.grad_query, problem.grad_key, problem.grad_value)
                if direction not in reference:
                    reference[direction] = tuple(result.clone() for result in results)
                row["max_diff_vs_first"] = largest_difference(results, reference[direction])
                row["s"] = timer(run, repeats, 1)
                row["tflops"] = (4 if direction == "forward" else 10) * problem.pairs * problem.d_head / row["s"] / 1e12
                if direction == "forward":
                    query_tiles = query_block // min(query_block, launch.query_tile)
                    row["kv_tb_s"] = problem.kv_bytes * query_tiles / row["s"] / 1e12
                if args.profile:
                    row["profile"] = device_profile(run, args.device, args.profile)
            except Exception as error:  # noqa: BLE001 (a variant that fails to compile must not lose the others)
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--geometries", nargs="+", default=["64x64", "128x64"],
                        help="query block x key block; the first runs --forward / --backward, the others --other-*")
    parser.add_argument("--forward", nargs="+", default=DEFAULT_FORWARD, help="forward launch specs (first: baseline)")
    parser.add_argument("--backward", nargs="+", default=DEFAULT_BACKWARD, help="backward launch specs")
    parser.add_argument("--other-forward", nargs="+", default=OTHER_FORWARD)
    parser.add_argument("--other-backward", nargs="+", default=OTHER_BACKWARD)
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats at <= 128k (a third beyond)")
    parser.add_argument("--keep", type=int, default=5, help="variants per direction timed after the first length")
    parser.add_argument("--dense-limit", type=float, default=8.0, help="skip dense SDPA predicted above (s)")
    parser.add_argument("--budget", type=float, default=100.0, help="start no variant after this many seconds")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="one more call of each variant under torch.profiler; keep its N costliest kernels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_sweep.json"))
    args = parser.parse_args()
    for spec in args.forward + args.backward + args.other_forward + args.other_backward:
        parse_launch(spec)
    if args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 before Triton is imported (pass --device cpu).")
    timer, started, rows, dense_measured = make_timer(args.device), time.perf_counter(), [], {}
    for index, geometry in enumerate(args.geometries):
        specs = ({"forward": args.forward, "backward": args.backward} if index == 0 else
                 {"forward": args.other_forward, "backward": args.other_backward})
        for seq_len in sorted(args.lengths):
            qkv = random_qkv(args.shape, seq_len, args.device)
            length_rows = sweep_length(qkv, geometry, args, timer, started, specs)
            rows += length_rows
            if index == 0:
                rows += [{"shape": args.shape, "geometry": "dense"} | row
                         for row in dense_rows(qkv, dense_measured, args, timer)]
            specs = {direction: fastest(length_rows, direction, chosen, args.keep)
                     for direction, chosen in specs.items()}
            del qkv
            if args.device == "cuda":
                torch.cuda.empty_cache()
    result = environment(args.device) | {"shape": args.shape, "top_k": args.top_k, "rows": rows,
                                         "total_s": time.perf_counter() - started,
                                         "command": command("attention_sweep.py", "python3")}
    save_json(args.out, result)
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, {args.shape} heads, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}, top_k {args.top_k} (Stream), "
          f"{result['total_s']:.0f} s in all")
    print_table(["T", "blocks", "direction", "variant", "ms", "TFLOP/s", "K/V TB/s", "vs first", "of dense",
                 "max diff vs first"], table_rows(rows))
    for row in rows:
        if "profile" in row:
            print(f"\nprofile: {row['seq_len']:,} tokens, {row['geometry']}, {row['direction']} {row['variant']}, "
                  f"{row['profile']['device_ms_total']:.2f} ms of device time")
            print_table(["kernel", "calls", "ms", "share"], [[kernel["name"], kernel["calls"],
                        f"{kernel['device_ms']:.3f}", f"{kernel['share']:.1%}"] for kernel in row["profile"]["top"]])


def table_rows(rows: list[dict]) -> list[list[str]]:
    """One formatted line per row: time, TFLOP/s, the forward's K/V read rate, the ratio to the first
    variant of its length / geometry / direction, the share of dense SDPA's time."""
    firsts, dense, lines = {}, {}, []
    for r in rows:
        if r["kernel"] == "dense_sdpa" and "s" in r:
            dense[(r["seq_len"], r["direction"])] = r["s"]
    for r in rows:
        timed, sparse = "s" in r, r["kernel"] == "block_sparse"
        key = (r["seq_len"], r["geometry"], r["direction"])
        if timed and sparse:
            firsts.setdefault(key, r["s"])
        dense_s = dense.get((r["seq_len"], r["direction"]))
        lines.append([f"{r['seq_len']:,}", r["geometry"], r["direction"], r.get("variant", "dense SDPA"),
                      f"{r['s'] * 1e3:.2f}" if timed else r.get("error", r.get("note", "-"))[:60],
                      f"{r['tflops']:.3g}" if "tflops" in r else "-",
                      f"{r['kv_tb_s']:.2f}" if "kv_tb_s" in r else "-",
                      f"{firsts[key] / r['s']:.2f}x" if timed and sparse else "-",
                      f"{r['s'] / dense_s * 100:.2f}%" if timed and dense_s else "-",
                      f"{r['max_diff_vs_first']:.2g}" if "max_diff_vs_first" in r else "-"])
    return lines


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDNN_SDPA_ENABLED", "1")
    main()
