"""The default estimator's cost: Stream, the old two-kernel rescoring, the fused rescoring variants and
adaptive, against dense cuDNN SDPA in the same run; plus the attention kernel's effective TFLOP/s.

    python3 benchmarks/rescore.py --out $OUT/rescore_h200.json                 # H200: 128k and 1M
    python3 benchmarks/rescore.py --device cpu --lengths 512 --shapes tiny     # CPU smoke run (interpreter)

One layer, random bf16 q / k / v, head dim 128, 64-token blocks, sink 1, local 1 (``--local``), ``top_k`` 16.
Rows (``--variants``, each ``name[:beam=B][:rk=R][:qs=S][:p=P][:search=stream|bounds][:sqs=S]``):
- ``stream``: Stream's Triton search with ``top_k`` branches (``rk`` representative keys);
- ``two_kernel``: the previous default path: Stream's search with ``beam`` x the branches, the whole
  block-sparse attention kernel over the candidates for its ``block_mass``, a torch top-k;
- ``rescored``: Stream's search with ``beam`` x the branches, then the fused rescoring kernel
  (``rescore_triton``: q.k over the candidates only, every ``qs``-th query, top-k in the kernel);
  also timed alone: ``search_s`` (the search) and ``rescore_s`` (the fused kernel on its output);
- ``adaptive``: Stream's search with ``top_k`` candidates, fused rescoring with top-p ``p``;
- ``search=bounds`` (rescored, adaptive): the candidates come from the bounds search's Triton kernel
  (``bounds_triton``: Quest's key min / max bound, the sparse table built in torch each call, part
  of the time) instead of Stream's (``rescore_search="bounds"``); ``sqs=S`` (rescored with the
  bounds search only) scores the search with every ``S``-th query of a block (the kernel's
  ``query_stride``; not a package setting: the row composes the two kernels directly).
Every row gives the estimate time and its ratio to dense causal SDPA (cuDNN, flash fallback; GQA) on
the same tensors, timed in the same run. The ``attention`` row times block-sparse attention on the
first variant's blocks: time, ratio to dense, and effective TFLOP/s = kept causal query-key pairs x
4 x d_head / time (QK^T and PV, 2 FLOPs per multiply-add). Dense above ``--dense-limit`` seconds
(predicted from the previous length, x (T'/T)^2) is skipped. CUDA-event medians; the CPU path times
wall clock once (Triton interpreter) and is a smoke test only. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _runs_on_cpu(argv: list[str]) -> bool:
    if "--device" in argv:
        return argv[argv.index("--device") + 1:][:1] == ["cpu"]
    return not torch.cuda.is_available()


if _runs_on_cpu(sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import attention_heads, command, dense_sdpa, save_json, time_cuda  # noqa: E402
from sparse_lens.kernels.blocks import kept_pairs_per_slot  # noqa: E402
from sparse_lens.kernels.bounds_triton import bounds_estimate_triton  # noqa: E402
from sparse_lens.kernels.dispatch import block_sparse_attention, stream_estimate  # noqa: E402
from sparse_lens.kernels.estimate import estimate_blocks  # noqa: E402
from sparse_lens.kernels.rescore import keep_heaviest  # noqa: E402
from sparse_lens.kernels.rescore_triton import rescore_top_k_triton  # noqa: E402

SHAPES = {"qwen2.5-1.5b": attention_heads("qwen2.5-1.5b"), "llama-3.1-8b": attention_heads("llama-3.1-8b"),
          "tiny": (2, 1, 32)}  # (query heads, key/value heads, head dim)
DEFAULT_VARIANTS = ["stream", "two_kernel:beam=4", "rescored:beam=4", "rescored:beam=4:qs=4",
                    "rescored:beam=8:rk=2:qs=4", "rescored:beam=8:rk=4:qs=4", "rescored:beam=6:qs=4",
                    "rescored:beam=8:qs=4", "rescored:beam=2:qs=4:search=bounds", "rescored:beam=4:qs=4:search=bounds",
                    "adaptive:qs=4:p=0.93"]
SINK, LOCAL = 1, 1  # --local overrides LOCAL (0 with top_k 15: the inner estimate of causal selection)


def parse_variant(spec: str) -> dict:
    """``"rescored:beam=8:rk=2:qs=4"`` -> {kind, beam, rk, qs, p, search} with defaults beam 4, rk 8,
    qs 1, p 0.93, search stream."""
    kind, *options = spec.split(":")
    if kind not in ("stream", "two_kernel", "rescored", "adaptive"):
        raise SystemExit(f"unknown variant {spec!r}")
    settings = {"kind": kind, "beam": 4, "rk": 8, "qs": 1, "p": 0.93, "search": "stream", "sqs": 1}
    for option in options:
        name, value = option.split("=")
        if name not in settings or name == "kind":
            raise SystemExit(f"unknown option {name!r} in variant {spec!r} (beam, rk, qs, p, search, sqs)")
        settings[name] = float(value) if name == "p" else value if name == "search" else int(value)
    if settings["search"] not in ("stream", "bounds") or (settings["search"] == "bounds"
                                                          and kind not in ("rescored", "adaptive")):
        raise SystemExit(f"variant {spec!r}: search must be stream or bounds (bounds: rescored / adaptive only)")
    if settings["sqs"] != 1 and (kind, settings["search"]) != ("rescored", "bounds"):
        raise SystemExit(f"variant {spec!r}: sqs needs rescored with search=bounds")
    return settings


def make_timer(device: str):
    """``timer(fn, repeats) -> median seconds``: CUDA events on the GPU, one wall-clock run on the CPU."""
    if device == "cuda":
        return time_cuda

    def wall(fn, repeats):
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return wall


def wide_width(top_k: int, beam: int, local: int) -> int:
    """Slots of the rescored estimator's wide search: the sink and local blocks and ``beam`` times
    the searched ones (``rescore.rescored_estimate_unchecked``: ``n_fixed + beam * n_search``)."""
    return SINK + local + beam * (top_k - SINK - local)


def two_kernel_rescored(query, key, *, top_k, beam, rk, geometry):
    """The previous Triton path of estimate_blocks("rescored"): search, attention kernel's block_mass, torch top-k."""
    width = wide_width(top_k, beam, geometry["local_blocks"])
    candidates = stream_estimate(query, key, top_k=width, representative_keys=rk, backend="triton", **geometry)
    _, _, mass = block_sparse_attention(query, key, key, candidates, scale=query.shape[-1] ** -0.5, backend="triton",
                                        query_block=geometry["query_block"], key_block=geometry["key_block"])
    return keep_heaviest(candidates, mass, seq_len=query.shape[2], top_k=top_k, **geometry)


def variant_fn(settings: dict, query, key, top_k: int, geometry: dict):
    kind, beam, rk, qs = settings["kind"], settings["beam"], settings["rk"], settings["qs"]
    if kind == "two_kernel":
        return lambda: two_kernel_rescored(query, key, top_k=top_k, beam=beam, rk=rk, geometry=geometry)
    common = dict(top_k=top_k, representative_keys=rk, backend="triton", **geometry)
    if kind == "stream":
        return lambda: estimate_blocks(query, key, estimator="stream", **common)
    if kind == "rescored" and settings["sqs"] != 1:  # not a package setting: the two kernels composed here
        width = wide_width(top_k, beam, geometry["local_blocks"])
        search = candidate_search(settings, query, key, width, geometry)
        return lambda: rescore_top_k_triton(query, key, search(), top_k=top_k, query_stride=qs, **geometry)
    if kind == "rescored":
        return lambda: estimate_blocks(query, key, estimator="rescored", beam=beam, rescore_query_stride=qs,
                                       rescore_search=settings["search"], **common)
    return lambda: estimate_blocks(query, key, estimator="adaptive", rescore_query_stride=qs, top_p=settings["p"],
                                   min_blocks=4, rescore_search=settings["search"], **common)


def candidate_search(settings: dict, query, key, width: int, geometry: dict):
    """The rescored variant's search alone (``width`` candidates): Stream's kernel or the bounds kernel."""
    if settings["search"] == "bounds":
        return lambda: bounds_estimate_triton(query, key, top_k=width, query_stride=settings["sqs"], **geometry)
    return lambda: stream_estimate(query, key, top_k=width, representative_keys=settings["rk"], backend="triton",
                                   **geometry)


def bench_length(shape: str, seq_len: int, args, dense_predicted: float | None, timer) -> list[dict]:
    q_heads, kv_heads, d_head = SHAPES[shape]
    device = args.device
    generator = torch.Generator(device=device).manual_seed(seq_len)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda heads: torch.randn(1, heads, seq_len, d_head, device=device, dtype=dtype, generator=generator)  # noqa: E731
    query, key, value = make(q_heads), make(kv_heads), make(kv_heads)
    repeats = 5 if seq_len <= 131072 else 2
    geometry = dict(query_block=args.block, key_block=args.block, sink_blocks=SINK, local_blocks=args.local)
    base = {"shape": shape, "seq_len": seq_len, "top_k": args.top_k, "local_blocks": args.local}
    if dense_predicted is not None and dense_predicted > args.dense_limit:
        dense_s, dense_note = None, f"skipped: predicted {dense_predicted:.0f} s"
    else:
        dense_s, dense_note = timer(lambda: dense_sdpa(query, key, value), repeats if seq_len <= 131072 else 1), None
    rows = []
    first_blocks = None
    for spec in args.variants:
        settings = parse_variant(spec)
        fn = variant_fn(settings, query, key, args.top_k, geometry)
        row = {**base, "variant": spec, "estimate_s": timer(fn, repeats)}
        if settings["kind"] == "rescored":  # its two halves alone
            width = wide_width(args.top_k, settings["beam"], args.local)
            search = candidate_search(settings, query, key, width, geometry)
            candidates = search()
            row["search_s"] = timer(search, repeats)
            row["rescore_s"] = timer(lambda: rescore_top_k_triton(
                query, key, candidates, top_k=args.top_k, query_stride=settings["qs"], **geometry), repeats)
        if first_blocks is None:
            first_blocks = fn()
        rows.append(row)
    blocks = first_blocks
    attention = lambda: block_sparse_attention(query, key, value, blocks, scale=d_head**-0.5, backend="triton",  # noqa: E731
                                               query_block=args.block, key_block=args.block)
    kept_pairs = int(kept_pairs_per_slot(blocks, seq_len, args.block, args.block).sum())
    attention_s = timer(attention, repeats)
    rows.append({**base, "variant": f"attention (blocks of {args.variants[0]})", "estimate_s": None,
                 "attention_s": attention_s, "kept_pairs": kept_pairs,
                 "attention_tflops": kept_pairs * 4 * d_head / attention_s / 1e12})
    for row in rows:
        row["dense_s"], row["dense_note"] = dense_s, dense_note
        spent = row["estimate_s"] if row["estimate_s"] is not None else row["attention_s"]
        row["over_dense"] = spent / dense_s if dense_s else None
        print(json.dumps(row), flush=True)
    return rows


def print_table(result: dict) -> None:
    print(f"\n{result['device_name']}, torch {result['torch']}, triton {result['triton']}, "
          f"{'bf16' if result['device'] == 'cuda' else 'fp32'}, {result['block']}-token blocks, top_k {result['top_k']}, "
          f"sink {result['sink_blocks']}, local {result['local_blocks']}")
    print("| shape | T | variant | estimate ms | search ms | rescore ms | dense SDPA ms | / dense | attention TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda value: f"{value * 1e3:.2f}" if value is not None else "-"  # noqa: E731
    for r in result["rows"]:
        dense = ms(r["dense_s"]) if r["dense_s"] else r["dense_note"]
        ratio = f"{r['over_dense'] * 100:.2f}%" if r["over_dense"] is not None else "-"
        spent = r["estimate_s"] if r["estimate_s"] is not None else r["attention_s"]
        tflops = f"{r['attention_tflops']:.0f}" if "attention_tflops" in r else "-"
        print(f"| {r['shape']} | {r['seq_len']:,} | {r['variant']} | {ms(spent)} | {ms(r.get('search_s'))} | "
              f"{ms(r.get('rescore_s'))} | {dense} | {ratio} | {tflops} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "llama-3.1-8b"], choices=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--local", type=int, default=LOCAL,
                        help="local blocks (0 with --top-k 15: the estimate causal selection runs, one band block less)")
    parser.add_argument("--dense-limit", type=float, default=60.0, help="skip dense SDPA predicted above (s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rescore.json"))
    args = parser.parse_args()
    for spec in args.variants:  # refuse a bad spec before any work
        parse_variant(spec)
    if args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 before Triton is imported (pass --device cpu).")
    import triton

    timer = make_timer(args.device)
    rows = []
    for shape in args.shapes:
        previous = None
        for seq_len in sorted(args.lengths):
            predicted = None if previous is None or previous[1] is None else previous[1] * (seq_len / previous[0]) ** 2
            length_rows = bench_length(shape, seq_len, args, predicted, timer)
            rows += length_rows
            previous = (seq_len, length_rows[0]["dense_s"])
            if args.device == "cuda":
                torch.cuda.empty_cache()
    result = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "block": args.block, "top_k": args.top_k,
              "sink_blocks": SINK, "local_blocks": args.local,
              "rows": rows, "command": command("rescore.py", python="python3")}
    save_json(args.out, result)
    print_table(result)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDNN_SDPA_ENABLED", "1")
    main()
