"""Kernel timings on one GPU: block estimation and block-sparse attention against dense cuDNN SDPA.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h200.json
    python3 benchmarks/kernels.py --shapes qwen2.5-1.5b --lengths 131072 1048576 --top-k 16 \
        --estimators stream rescored rescored:expand=2 rescored:expand=2:qs=4 --out $OUT/kernels.json
    python benchmarks/kernels.py --device cpu --shapes qwen2.5-1.5b --lengths 512 --top-k 4 \
        --estimators stream rescored:expand=2      # CPU smoke run (Triton interpreter, fp32, wall clock)

One layer, bf16, head dim 128, shapes Qwen2.5-1.5B (12 q / 2 kv heads) and Llama-3.1-8B
(32 q / 8 kv heads), T in {32k, 128k, 512k, 1M}, 64-token blocks, top_k in {16, 32}.
Times are CUDA-event medians after warm-up (fewer repeats at long T); dense SDPA is skipped where
the anchors say it takes over a minute. ``--estimators`` times other estimators than Stream
(``estimate_blocks``; only Stream has a Triton kernel, the others run their torch code on the
GPU). An estimator spec ``name[:beam=B][:qs=S][:expand=E][:select=rank|sort][:masked=0|1]`` passes
``beam`` / ``rescore_query_stride`` to ``estimate_blocks``; with any of the last three, ``stream``
and ``rescored`` run their Triton kernels directly with those kernel settings:
``stream_estimate_triton(expand_levels=E, select=...)`` (the expanded search: the narrow search
stopped ``E`` levels early, every block of its branches kept; the per-round selection by rank
counting or by one sort) and ``rescore_top_k_triton(masked_loop=...)`` (the branch-free candidate
loop). Rescored rows also time their search alone (``search_s``). A spec that fails (e.g. a kernel
that does not compile) leaves a row with its error. Imports no TransformerLens. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import attention_heads, command, dense_sdpa, save_json, time_cuda  # noqa: E402
from sparse_lens.kernels import block_sparse_attention, estimate_blocks  # noqa: E402
from sparse_lens.kernels.stream_triton import stream_estimate_triton  # noqa: E402
from sparse_lens.kernels.rescore_triton import rescore_top_k_triton  # noqa: E402

SHAPES = {name: attention_heads(name)[:2] for name in ("qwen2.5-1.5b", "llama-3.1-8b")}  # (q heads, kv heads)
DENSE_LIMIT_SECONDS = 60.0


def parse_estimator(spec: str) -> tuple[str, dict]:
    """``"rescored:beam=4:qs=4:expand=2"`` -> ("rescored", {"beam": 4, "qs": 4, "expand": 2})."""
    name, *options = spec.split(":")
    settings = {key: value if key == "select" else int(value) for key, value in (option.split("=") for option in options)}
    kernel_options = {"expand", "select", "masked"} & set(settings)
    if set(settings) - {"beam", "qs", "expand", "select", "masked"} or (kernel_options and name not in ("stream", "rescored")):
        raise SystemExit(f"bad estimator spec {spec!r}: options beam, qs, expand, select, masked (the last three: "
                         "stream or rescored only)")
    return name, settings


def estimator_fns(spec: str, query, key, top_k: int, geometry: dict) -> tuple:
    """``(estimate, search)``: the spec's estimate, and for rescored specs its candidate search alone."""
    name, settings = parse_estimator(spec)
    beam, stride = settings.get("beam", 4), settings.get("qs", 1)
    kernels = {"expand_levels": settings.get("expand", 0), "select": settings.get("select", "rank")}
    direct = bool({"expand", "select", "masked"} & set(settings))
    fixed = dict(sink_blocks=1, local_blocks=1, **geometry)
    package = lambda: estimate_blocks(query, key, estimator=name, top_k=top_k, beam=beam,  # noqa: E731
                                      rescore_query_stride=stride, backend="triton", **fixed)
    if name == "stream" and direct:
        return (lambda: stream_estimate_triton(query, key, top_k=top_k, **kernels, **fixed)), None
    if name != "rescored":
        return package, None
    width = 2 + beam * (top_k - 2)
    search = lambda: stream_estimate_triton(query, key, top_k=width, **kernels, **fixed)  # noqa: E731
    if not direct:  # the package's default path
        return package, search
    masked = bool(settings.get("masked", 0))
    return (lambda: rescore_top_k_triton(query, key, search(), top_k=top_k, query_stride=stride,  # noqa: E731
                                         masked_loop=masked, **fixed)), search


def make_timer(device: str):
    """``timer(fn, repeats) -> seconds``: CUDA-event medians, or one wall-clock run on the CPU (smoke)."""
    if device == "cuda":
        return time_cuda

    def wall(fn, repeats):
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return wall


def peak_gb(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_one(shape: str, seq_len: int, top_k: int, block: int, dense_cache: dict, estimator: str = "stream",
              device: str = "cuda") -> dict:
    q_heads, kv_heads = SHAPES[shape]
    timer = make_timer(device)
    generator = torch.Generator(device=device).manual_seed(seq_len)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda heads: torch.randn(1, heads, seq_len, 128, device=device, dtype=dtype, generator=generator)  # noqa: E731
    query, key, value = make(q_heads), make(kv_heads), make(kv_heads)
    repeats = 5 if seq_len <= 131072 else 2
    geometry = dict(query_block=block, key_block=block)
    estimate, search = estimator_fns(estimator, query, key, top_k, geometry)
    block_indices = estimate()
    attend = lambda: block_sparse_attention(query, key, value, block_indices, scale=128**-0.5, backend="triton", **geometry)  # noqa: E731
    row = {"shape": shape, "seq_len": seq_len, "top_k": top_k, "estimator": estimator,
           "estimate_s": timer(estimate, repeats), "sparse_attention_s": timer(attend, repeats),
           "estimate_peak_gb": peak_gb(estimate), "sparse_attention_peak_gb": peak_gb(attend)}
    if search is not None:
        row["search_s"] = timer(search, repeats)
    dense_key = (shape, seq_len)
    if dense_key not in dense_cache:
        predicted = dense_cache.get((shape, seq_len // 4), {}).get("dense_s", 0) * 16
        if predicted > DENSE_LIMIT_SECONDS:
            dense_cache[dense_key] = {"dense_s": None, "dense_note": f"skipped: predicted {predicted:.0f} s"}
        else:
            dense_cache[dense_key] = {"dense_s": timer(lambda: dense_sdpa(query, key, value), repeats if seq_len <= 131072 else 1),
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    args = parser.parse_args()
    for spec in args.estimators:
        parse_estimator(spec)
    import triton

    rows, dense_cache = [], {}
    for shape in args.shapes:
        for seq_len in args.lengths:
            for top_k in args.top_k:
                for estimator in args.estimators:
                    try:
                        rows.append(bench_one(shape, seq_len, top_k, args.block, dense_cache, estimator, args.device))
                    except Exception as error:  # noqa: BLE001 (one failing spec must not lose the others)
                        rows.append({"shape": shape, "seq_len": seq_len, "top_k": top_k, "estimator": estimator,
                                     "error": f"{type(error).__name__}: {str(error)[:300]}"})
                    print(json.dumps(rows[-1]), flush=True)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter, fp32; smoke run)"
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "torch": torch.__version__,
              "triton": triton.__version__, "block": args.block, "rows": rows, "command": command("kernels.py")}
    save_json(args.out, result)
    print(f"\n{result['gpu']}, torch {result['torch']}, triton {result['triton']}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}, d_head 128, {args.block}-token blocks")
    print("| shape | T | top_k | estimator | estimate ms | search ms | sparse attn ms | dense SDPA ms | est/dense | sparse/dense | est GB | sparse GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['seq_len']:,} | {r['top_k']} | {r['estimator']} | error: {r['error'][:80]} |")
            continue
        dense = f"{r['dense_s'] * 1e3:.1f}" if r.get("dense_s") else r.get("dense_note", "-")
        ratio = lambda key: f"{r[key] * 100:.2f}%" if key in r else "-"  # noqa: E731
        search = f"{r['search_s'] * 1e3:.2f}" if "search_s" in r else "-"
        gb = lambda key: f"{r[key]:.2f}" if r.get(key) is not None else "-"  # noqa: E731
        print(f"| {r['shape']} | {r['seq_len']:,} | {r['top_k']} | {r.get('estimator', 'stream')} | {r['estimate_s'] * 1e3:.2f} | {search} | {r['sparse_attention_s'] * 1e3:.2f} | "
              f"{dense} | {ratio('estimate_over_dense')} | {ratio('sparse_over_dense')} | {gb('estimate_peak_gb')} | {gb('sparse_attention_peak_gb')} |")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDNN_SDPA_ENABLED", "1")
    main()
