"""What is alive at the memory peak of one long sparse forward: the largest live allocations and where
they were made, in residual-stream copies (T x d_model x dtype bytes).

    python3 benchmarks/memory_profile.py --shape llama-3.1-8b --layers 32 --length 1048576 --out $OUT/memory_8b_1m.json
    python3 benchmarks/memory_profile.py --shape qwen2.5-1.5b --layers 28 --length 1048576 --out $OUT/memory_15b_1m.json
    python3 benchmarks/memory_profile.py --shape llama-3.1-8b --layers 2 --length 131072 --out $OUT/memory_8b_128k.json
    python3 benchmarks/memory_profile.py --shape tiny --length 512 --device cpu --out /tmp/memory_cpu.json
    python3 benchmarks/memory_profile.py --shape qwen2.5-1.5b --layers 28 --length 1048576 --run attribution_patching \
        --out $OUT/memory_attribution_1m.json      # what is alive at attribution patching's peak

A random-init model of the named shape with ``--layers`` layers (bf16 on CUDA), ``keep_qk=False``,
MLPs and norms chunked over ``--mlp-chunk`` positions, logits for the last position only, run as in
``benchmarks/model.py`` (``run_with_cache`` with every ``hook_pattern`` cached) after a warm-up at
``--warmup-length``. On CUDA the forward runs under ``torch.cuda.memory._record_memory_history``;
the allocation trace is replayed to the moment of the highest allocated total, and the allocations
live then are listed, largest first, with the innermost frame of this project, TransformerLens or
transformers that made each (``--frames`` frames of it), grouped by that call site. The snapshot is
saved too (``--snapshot``, for https://pytorch.org/memory_viz). On the CPU the same table comes
from counting live tensors: every tensor an op creates is counted from its creation until its
storage is freed (a ``TorchDispatchMode``, as ``tests/tl/test_forward_memory.py`` does), and the
ones alive at the highest total are listed by call site (the kernels are then the torch
references, whose rescoring allocates far more than the Triton path: a smoke test; for the Triton
wrappers' buffers see the test). Prints tables, writes JSON.

Found so far (the forward; issue 11): HF's default KV cache kept every layer's keys and values
(16 residual copies for the Llama-3.1-8B shape; the forward now passes ``use_cache=False``; compare
with ``--kv-cache``); TransformerLens' norm bridge held four float32 ``[T, d_model]`` tensors (its
hook values and HF's upcast: 8 copies, the forward's peak) and RoPE three whole-sequence
temporaries, both now chunked (``sparse_lens.tl.chunking``, ``tl.attention.apply_rotary``). Left at
the peak (rotating a layer's queries, ~6 copies): the embedding (HF's forward holds it to the end),
the residual stream, the attention's input norm, the q / k / v projections and the rotated q / k.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import traceback
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
    """As ``benchmarks/model.py`` runs it; ``use_cache=None``: the forward's default (no KV cache),
    ``True``: HF's KV cache of every layer's keys and values is built during the forward."""
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


class LiveTensors(TorchDispatchMode):
    """Every tensor an op creates while the mode is on, from its creation until its storage is freed
    (views and in-place results are not new): the peak of their total bytes and what was alive then,
    each with the call site that made it (as :func:`call_site` names CUDA allocations)."""

    def __init__(self, frames: int):
        super().__init__()
        self.frames, self.live, self.total, self.peak, self.at_peak = frames, {}, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in inputs and pointer not in self.live:
                stack = [{"filename": f.filename, "line": f.lineno, "name": f.name}
                         for f in reversed(traceback.extract_stack())]
                self.live[pointer] = (storage.nbytes(), call_site(stack, self.frames))
                self.total += storage.nbytes()
                weakref.finalize(storage, self._free, pointer)
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.live)
        return out

    def _free(self, pointer):
        entry = self.live.pop(pointer, None)
        if entry is not None:
            self.total -= entry[0]


def profile_cpu(model, args, residual_bytes: int) -> dict:
    recorder = LiveTensors(args.frames)
    started = time.perf_counter()
    with recorder:
        outputs = RUNS[args.run](model, args.length, args.device, args.use_cache)
    seconds = time.perf_counter() - started
    del outputs
    sites = defaultdict(lambda: {"bytes": 0, "count": 0})
    for size, site in recorder.at_peak.values():
        sites[site]["bytes"] += size
        sites[site]["count"] += 1
    top = sorted(sites.items(), key=lambda item: -item[1]["bytes"])[:args.top]
    return {"seconds": seconds, "activation_peak_gb": recorder.peak / 2**30,
            "activation_peak_residual_copies": recorder.peak / residual_bytes,
            "live_at_peak": [{"site": site, "count": v["count"], "gb": v["bytes"] / 2**30,
                              "residual_copies": v["bytes"] / residual_bytes} for site, v in top]}


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
    parser.add_argument("--kv-cache", dest="use_cache", action="store_const", const=True, default=None,
                        help="pass use_cache=True (HF builds a KV cache of every layer; default: the forward's, none)")
    parser.add_argument("--no-kv-cache", dest="use_cache", action="store_const", const=False,
                        help="pass use_cache=False (the forward's default since it was found)")
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
        print(f"peak allocated {result['peak_allocated_gb']:.2f} GB, of which ", end="")
    print(f"activations {result['activation_peak_gb']:.2f} GB = {result['activation_peak_residual_copies']:.1f} "
          "residual copies")
    print("\n| live at the peak: call site | allocations | GB | residual copies |\n|---|---|---|---|")
    for row in result["live_at_peak"]:
        print(f"| {row['site']} | {row['count']} | {row['gb']:.3f} | {row['residual_copies']:.2f} |")

if __name__ == "__main__":
    os.environ.setdefault("TORCH_CUDNN_SDPA_ENABLED", "1")
    main()
