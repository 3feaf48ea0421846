"""What is alive at the memory peak of one long sparse forward: the largest live allocations and where
they were made, in residual-stream copies (T x d_model x dtype bytes).

    python3 benchmarks/memory_profile.py --shape llama-3.1-8b --layers 2 --length 131072 --out $OUT/memory_8b_128k.json
    python3 benchmarks/memory_profile.py --shape tiny --length 512 --device cpu --out /tmp/memory_cpu.json
    python3 benchmarks/memory_profile.py --shape qwen2.5-1.5b --layers 28 --length 1048576 --run attribution_patching \
        --out $OUT/memory_attribution_1m.json      # what is alive at attribution patching's peak

A random-init model of the named shape with ``--layers`` layers (bf16 on CUDA), ``keep_qk=False``,
MLPs chunked over ``--mlp-chunk`` positions, logits for the last position only, run as in
``benchmarks/model.py`` (``run_with_cache`` with every ``hook_pattern`` cached) after a warm-up at
``--warmup-length``. On CUDA the forward runs under ``torch.cuda.memory._record_memory_history``;
the allocation trace is replayed to the moment of the highest allocated total, and the allocations
live then are listed, largest first, with the innermost frame of this project, TransformerLens or
transformers that made each (``--frames`` frames of it), grouped by that call site. The snapshot is
saved too (``--snapshot``, for https://pytorch.org/memory_viz). On the CPU (smoke test) the
profiler's per-operator memory table is printed instead. Prints tables, writes JSON.

Found by reading the code path (and counting live tensors at a layer's entry on the CPU): a plain
forward lets HF build its ``DynamicCache``, so every layer's rotated keys and values stay alive to
the end of the forward, though nothing reads them: ``2 * kv_heads * d_head / d_model`` residual
copies per layer, 16 copies for the Llama-3.1-8B shape (32 layers x 0.5; 128 GB at 1M tokens), 9.3
for Qwen2.5-1.5B. ``--no-kv-cache`` passes ``use_cache=False``; compare the two runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import build_model, cached_forward, command, device_name, hf_config, save_json  # noqa: E402

SHAPE_NAMES = ["qwen2.5-1.5b", "llama-3.1-8b", "tiny"]
OWN_CODE = ("sparse_lens", "transformer_lens", "transformers")


def build(args):
    import sparse_lens as sl

    config = hf_config(args.shape, layers=args.layers)
    stream = sl.StreamConfig(query_block=args.block, key_block=args.block, top_k=args.top_k, keep_qk=False,
                             estimator=args.estimator)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_model(config, stream=stream, dtype=dtype, device=args.device, mlp_chunk=args.mlp_chunk)
    return model, config.hidden_size, dtype


def attribution(model, length: int, device: str, use_cache: bool | None = None):
    """Attribution patching of every head (the first half of the tokens corrupted), metric: a logit
    difference at the last position, as ``benchmarks/circuits.py`` runs it."""
    from sparse_lens.analysis.attribution_patching import attribution_patching

    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    corrupted = tokens.clone()
    corrupted[:, : length // 2] = torch.randint(0, model.cfg.d_vocab, (1, length // 2), device=device)
    return attribution_patching(model, tokens, corrupted, lambda logits: logits[0, -1, 1].float() - logits[0, -1, 2].float(),
                                positions=[-1])


def block_attribution(model, length: int, device: str, use_cache: bool | None = None):
    """Gate gradients of every kept block (``interventions.block_attribution``), same metric."""
    from sparse_lens.analysis.interventions import block_attribution as run

    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    return run(model, tokens, lambda logits: logits[0, -1, 1].float() - logits[0, -1, 2].float(), positions=[-1])


def forward(model, length: int, device: str, use_cache: bool | None = None):
    """``use_cache=None``: as ``benchmarks/model.py`` (HF's default: a KV cache of every layer's keys
    and values is built during the forward, though nothing reads it); ``False``: no KV cache."""
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=device)
    return cached_forward(model, tokens, **({} if use_cache is None else {"use_cache": use_cache}))


RUNS = {"forward": forward, "attribution_patching": attribution, "block_attribution": block_attribution}


def call_site(frames: list[dict], depth: int) -> str:
    """The innermost ``depth`` frames from this project, TransformerLens or transformers."""
    own = [f for f in frames if any(f"/{package}/" in f["filename"] for package in OWN_CODE)]
    chosen = own[:depth] or frames[:depth]
    return " <- ".join(f"{f['filename'].split('site-packages/')[-1].split('/work/main/')[-1]}:{f['line']} "
                       f"{f['name']}" for f in chosen)


def live_at_peak(snapshot: dict) -> tuple[int, list[dict]]:
    """Replay the allocation trace: (peak allocated bytes, allocations live at that moment).
    A block counts from ``alloc`` to ``free_requested``. Allocations made before recording started
    (weights, inputs) are absent from the trace."""
    events = [event for trace in snapshot["device_traces"] for event in trace]

    def replay(stop: int | None):
        live, total, peak, peak_at = {}, 0, 0, 0
        for index, event in enumerate(events[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
            elif event["action"] == "free_requested" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
            if total > peak:
                peak, peak_at = total, index
        return live, peak, peak_at

    _, peak, peak_at = replay(None)
    live, _, _ = replay(peak_at + 1)
    return peak, sorted(live.values(), key=lambda event: -event["size"])


def profile_cuda(model, args, residual_bytes: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    started = time.perf_counter()
    outputs = RUNS[args.run](model, args.length, args.device, args.use_cache)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_total = torch.cuda.max_memory_allocated()
    del outputs
    if args.snapshot:
        args.snapshot.parent.mkdir(parents=True, exist_ok=True)
        args.snapshot.write_bytes(pickle.dumps(snapshot))
    traced_peak, allocations = live_at_peak(snapshot)
    sites = defaultdict(lambda: {"bytes": 0, "count": 0})
    for event in allocations:
        site = sites[call_site(event.get("frames", []), args.frames)]
        site["bytes"] += event["size"]
        site["count"] += 1
    top = sorted(sites.items(), key=lambda item: -item[1]["bytes"])[:args.top]
    return {"seconds": seconds, "allocated_before_gb": before / 2**30, "peak_allocated_gb": peak_total / 2**30,
            "activation_peak_gb": (peak_total - before) / 2**30,
            "activation_peak_residual_copies": (peak_total - before) / residual_bytes,
            "traced_peak_gb": traced_peak / 2**30,
            "live_at_peak": [{"site": site, "count": v["count"], "gb": v["bytes"] / 2**30,
                              "residual_copies": v["bytes"] / residual_bytes} for site, v in top]}


def profile_cpu(model, args, residual_bytes: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        RUNS[args.run](model, args.length, args.device, args.use_cache)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_memory_usage)[:args.top]
    print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=args.top))
    return {"live_at_peak": [], "cpu_operators": [
        {"operator": e.key, "calls": e.count, "self_allocated_mb": e.self_cpu_memory_usage / 2**20,
         "residual_copies": e.self_cpu_memory_usage / residual_bytes} for e in events]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=SHAPE_NAMES)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--estimator", default="rescored")
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--warmup-length", type=int, default=4096)
    parser.add_argument("--top", type=int, default=25, help="call sites listed")
    parser.add_argument("--frames", type=int, default=3, help="frames per call site")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-kv-cache", dest="use_cache", action="store_const", const=False, default=None,
                        help="pass use_cache=False (default: HF's default, which builds a KV cache)")
    parser.add_argument("--run", choices=list(RUNS), default="forward",
                        help="what is profiled: the forward with patterns cached, or a gradient tool (forward + backward)")
    parser.add_argument("--snapshot", type=Path, default=None, help="also save the raw snapshot (pickle) here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_profile.json"))
    args = parser.parse_args()
    model, d_model, dtype = build(args)
    residual_bytes = args.length * d_model * dtype.itemsize
    RUNS[args.run](model, min(args.warmup_length, args.length), args.device)  # compiles the kernels
    profile = profile_cuda if args.device.startswith("cuda") else profile_cpu
    result = {"date": time.strftime("%Y-%m-%d"), "run": args.run, "shape": args.shape, "layers": args.layers,
              "length": args.length,
              "use_cache": args.use_cache,
              "dtype": str(dtype), "device": device_name(args.device),
              "residual_copy_gb": residual_bytes / 2**30, **profile(model, args, residual_bytes),
              "command": command("memory_profile.py", python="python3")}
    save_json(args.out, result)
    print(f"\n{args.shape}, {args.layers} layers, {args.length:,} tokens, {dtype}, {result['device']}; "
          f"one residual-stream copy = {residual_bytes / 2**30:.3f} GB")
    if "peak_allocated_gb" in result:
        print(f"peak allocated {result['peak_allocated_gb']:.2f} GB, of which activations "
              f"{result['activation_peak_gb']:.2f} GB = {result['activation_peak_residual_copies']:.1f} residual copies")
        print("\n| live at the peak: call site | allocations | GB | residual copies |\n|---|---|---|---|")
        for row in result["live_at_peak"]:
            print(f"| {row['site']} | {row['count']} | {row['gb']:.3f} | {row['residual_copies']:.2f} |")
    else:
        print("\n| operator | calls | self allocated MB | residual copies |\n|---|---|---|---|")
        for row in result["cpu_operators"]:
            print(f"| {row['operator']} | {row['calls']} | {row['self_allocated_mb']:.2f} | {row['residual_copies']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDNN_SDPA_ENABLED", "1")
    main()
