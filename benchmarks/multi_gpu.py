"""Beyond one GPU (issue 15): layers across GPUs and heads across GPUs. Prints a table, saves JSON.

Parts (the first argument):
- ``layers``: a random-init model whose layers accelerate spreads over the GPUs
  (``from_config(..., n_devices=N)`` or ``--device-map``), one sparse forward per length with every
  layer's ``hook_pattern`` cached (last position's logits only); per row seconds, peak GB per GPU,
  pattern bytes. ``--compare`` runs the same weights on one GPU afterwards (where they fit) and
  records the largest last-position logit difference;
- ``attribution``: attribution patching of every head (clean / corrupted, one checkpointed
  backward, ``sparse_lens.analysis.attribution_patching``) on a model with its layers across GPUs;
- ``heads``: heads across GPUs for one sequence (Ulysses, ``sparse_lens.tl.sequence_parallel``),
  one process per GPU launched by ``torchrun``; each rank holds the whole model and ``T / P``
  positions; the forward caches every layer's pattern (each rank its heads). ``--one-gpu-baseline``
  also times the unsharded forward on rank 0 alone (out of memory is recorded) and compares the
  last position's logits.

On two H200s (``. benchmarks/gpu_env.sh`` first; random-init, bf16, default StreamConfig with keep_qk=False)::

    python3 benchmarks/multi_gpu.py layers --shape r1-distill-qwen-32b --lengths 131072 524288 --n-devices 2 --compare --out $OUT/multi_gpu_layers_32b.json
    python3 benchmarks/multi_gpu.py layers --shape llama-3.1-70b --lengths 131072 --n-devices 2 --out $OUT/multi_gpu_layers_70b.json
    python3 benchmarks/multi_gpu.py attribution --shape llama-3.1-8b --lengths 1048576 --n-devices 2 --out $OUT/multi_gpu_attribution_8b.json
    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py heads --shape qwen2.5-1.5b --lengths 2097152 --one-gpu-baseline --out $OUT/multi_gpu_heads_15b.json
    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py heads --shape llama-3.1-8b --lengths 1048576 --one-gpu-baseline --out $OUT/multi_gpu_heads_8b.json

On the CPU (a tiny model of the shape's head ratio, gloo)::

    python benchmarks/multi_gpu.py layers --device cpu --tiny --lengths 512 --compare --out /tmp/multi_gpu_layers.json
    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py heads --device cpu --tiny --lengths 512 --one-gpu-baseline --out /tmp/multi_gpu_heads.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.circuits import metric  # noqa: E402
from benchmarks.common import SHAPES, build_model, cached_forward, clean_and_corrupted, hf_config  # noqa: E402
from benchmarks.common import print_table, save_json  # noqa: E402
from benchmarks.common import timed as timed_row  # noqa: E402

SHAPE_NAMES = ["llama-3.1-70b", "llama-3.1-8b", "qwen2.5-1.5b", "r1-distill-qwen-32b"]


def model_config(args) -> Any:
    """The shape's HF config; ``--tiny``: 2 layers, 16-dim heads, the shape's q / kv head ratio."""
    if not args.tiny:
        return hf_config(args.shape, layers=args.layers)
    settings = SHAPES[args.shape][1]
    group = settings["num_attention_heads"] // settings["num_key_value_heads"]
    return hf_config(args.shape, layers=args.layers, vocab_size=1000, num_hidden_layers=2, num_key_value_heads=2,
                     num_attention_heads=2 * group, hidden_size=32 * group, intermediate_size=64 * group)


def build(args, **where) -> Any:
    return build_model(model_config(args), seed=args.seed, dtype=args.dtype, mlp_chunk=args.mlp_chunk, **where)


def placement(args) -> dict:
    """``from_config`` keywords for layers across devices (a CPU run maps every layer to "cpu")."""
    if args.device == "cpu":
        return {"device_map": "auto"}
    if args.device_map:
        return {"device_map": json.loads(args.device_map) if args.device_map.startswith("{") else args.device_map}
    return {"n_devices": args.n_devices}


def timed(device: str, work: Callable[[], dict]) -> dict:
    """Seconds and peak GB per GPU (``peak_gb``) of ``work()``; an error (out of memory too) becomes the
    row's ``error``, recorded, not fatal: the other rows still run."""
    row = timed_row(device, work, catch=(Exception,), every_gpu=True)
    row["seconds"] = round(row["seconds"], 3)
    return row


def forward_with_patterns(model, clean: torch.Tensor, **kwargs) -> dict:
    """One sparse forward, every layer's pattern cached; the last position's logits (CPU) and sizes."""
    logits, patterns = cached_forward(model, clean, use_cache=False, **kwargs)
    return {"cached_patterns": len(patterns), "pattern_bytes": sum(p.nbytes() for p in patterns),
            "pattern_devices": sorted({str(p.device) for p in patterns}),
            "last_logits": logits[0, -1].float().cpu()}


def max_difference(row: dict, reference: dict) -> float | None:
    """The largest last-position logit difference; also records the reference's largest |logit|
    (``max_abs_logit``) and the top-1 agreement in ``row``, so a bf16 difference can be judged."""
    mine, theirs = row.get("result", {}).get("last_logits"), reference.get("result", {}).get("last_logits")
    if mine is None or theirs is None:
        return None
    row["max_abs_logit"] = float(theirs.abs().max())
    row["same_top1"] = bool(mine.argmax() == theirs.argmax())
    return float((mine - theirs).abs().max())


# ----- parts ----------------------------------------------------------------------------------------
def part_layers(args) -> list[dict]:
    model = build(args, **placement(args))
    devices = sorted({str(d) for d in (next(b.parameters()).device for b in model.blocks)})
    warm, _ = clean_and_corrupted(model, min(args.warmup_length, min(args.lengths)), model.cfg.device)
    forward_with_patterns(model, warm)  # compiles the kernels on every device; an error here stops the run
    rows = []
    for length in args.lengths:
        clean, _ = clean_and_corrupted(model, length, model.cfg.device)
        rows.append({"part": "layers", "length": length, "devices": devices,
                     **timed(args.device, lambda: forward_with_patterns(model, clean))})
        print(json.dumps(printable(rows[-1])), flush=True)
    if args.compare:
        del model
        gc.collect()
        one = "cpu" if args.device == "cpu" else "cuda:0"
        # the same weights: a GPU map builds every module on its GPU with a per-module seed
        single = build(args, device=one) if args.device == "cpu" else build(args, device_map={"": 0})
        forward_with_patterns(single, warm.to(one))
        for row in list(rows):
            clean, _ = clean_and_corrupted(single, row["length"], one)
            reference = {"part": "layers", "length": row["length"], "devices": [one],
                         **timed(args.device, lambda: forward_with_patterns(single, clean))}
            row["max_logit_difference_vs_one_device"] = max_difference(row, reference)
            rows.append(reference)
            print(json.dumps(printable(reference)), flush=True)
    return rows


def part_attribution(args) -> list[dict]:
    from sparse_lens.analysis.attribution_patching import attribution_patching

    model = build(args, **placement(args))
    devices = sorted({str(d) for d in (next(b.parameters()).device for b in model.blocks)})

    def run(length: int) -> dict:
        clean, corrupted = clean_and_corrupted(model, length, model.cfg.device)
        result = attribution_patching(model, clean, corrupted, metric, positions=[-1], heads=True,
                                      offload=args.offload, offload_activations=args.offload,
                                      segment_layers=args.segment_layers)
        return {"clean_metric": result.clean_metric, "corrupted_metric": result.corrupted_metric,
                "top_heads": result.top_heads(3)}

    run(min(args.warmup_length, min(args.lengths)))  # warm-up: an error here stops the run, with its traceback
    rows = []
    for length in args.lengths:
        rows.append({"part": "attribution", "length": length, "devices": devices, **timed(args.device, lambda: run(length))})
        print(json.dumps(printable(rows[-1])), flush=True)
    return rows


def part_heads(args) -> list[dict]:
    """Run under torchrun: one rank per GPU (or CPU process with gloo)."""
    from sparse_lens.tl.sequence_parallel import sequence_parallel, shard_sequence

    cpu = args.device == "cpu"
    dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if not cpu:
        torch.cuda.set_device(device)
    model = build(args, device=device)

    def sharded(length: int) -> dict:
        clean, _ = clean_and_corrupted(model, length, device)
        local, positions = shard_sequence(clean)
        with sequence_parallel(model):
            result = forward_with_patterns(model, local, position_ids=positions)
        dist.barrier()
        return result

    sharded(min(args.warmup_length, min(args.lengths)))
    rows = []
    for length in args.lengths:
        row = {"part": "heads", "length": length, "ranks": world, **timed(device, lambda: sharded(length))}
        if "peak_gb" in row:  # each process sees its own GPU's allocations only
            peaks = [None] * world
            dist.all_gather_object(peaks, row["peak_gb"][torch.device(device).index])
            row["peak_gb"] = peaks
        last = [None] * world
        dist.all_gather_object(last, row.get("result", {}).get("last_logits"))
        if "result" in row:
            row["result"]["last_logits"] = last[-1]  # the last shard ends with the sequence's last position
        rows.append(row)
        if args.one_gpu_baseline:
            if rank == 0:
                clean, _ = clean_and_corrupted(model, length, device)
                baseline = {"part": "heads", "length": length, "ranks": 1,
                            **timed(device, lambda: forward_with_patterns(model, clean))}
                row["max_logit_difference_vs_one_device"] = max_difference(row, baseline)
                if "error" not in row and "error" not in baseline:
                    row["time_vs_one_device"] = round(row["seconds"] / baseline["seconds"], 3)
                rows.append(baseline)
            dist.barrier()
        if rank == 0:
            for shown in rows[-2 if args.one_gpu_baseline else -1:]:
                print(json.dumps(printable(shown)), flush=True)
    dist.destroy_process_group()
    return rows if rank == 0 else []


def printable(row: dict) -> dict:
    """The row without tensors (for JSON)."""
    return {key: (printable(value) if isinstance(value, dict) else value)
            for key, value in row.items() if not isinstance(value, torch.Tensor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["layers", "attribution", "heads"])
    parser.add_argument("--shape", choices=SHAPE_NAMES, default="qwen2.5-1.5b")
    parser.add_argument("--tiny", action="store_true", help="2 layers, 16-dim heads, vocab 1000 (CPU smoke runs)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--n-devices", type=int, default=2, help="layers / attribution: GPUs to spread over")
    parser.add_argument("--device-map", default=None, help='accelerate map: "auto", "balanced", "sequential" or JSON')
    parser.add_argument("--compare", action="store_true", help="layers: rerun on one device, compare logits")
    parser.add_argument("--one-gpu-baseline", action="store_true", help="heads: time the unsharded forward on rank 0")
    parser.add_argument("--offload", action="store_true", help="attribution: checkpoints and differences in host memory")
    parser.add_argument("--segment-layers", type=lambda text: text if text == "sqrt" else int(text), default="sqrt",
                        help="attribution: blocks per checkpointed segment (a segment's recomputation must fit on "
                             "one GPU: fewer blocks, less memory per GPU, more segment inputs in host memory)")
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_gpu.json"))
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    rows = {"layers": part_layers, "attribution": part_attribution, "heads": part_heads}[args.part](args)
    if not rows:  # ranks other than 0
        return
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if args.device != "cpu" else ["cpu"]
    result = {"date": time.strftime("%Y-%m-%d"), "devices": gpus, "torch": torch.__version__,
              "model": f"random-init {args.shape} shape" + (" (tiny)" if args.tiny else ""),
              "config": vars(args) | {"out": str(args.out)}, "rows": [printable(row) for row in rows],
              "command": "python benchmarks/multi_gpu.py " + " ".join(sys.argv[1:])}
    save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, {', '.join(gpus)}: {args.part}")
    print_table(["part", "tokens", "devices / ranks", "seconds", "peak GB per GPU", "max logit diff vs one device",
                 "max abs logit", "same top-1", "time vs one device"], [
        [row["part"], f"{row['length']:,}", row.get("devices") or f"{row['ranks']} rank(s)",
         row.get("error") or f"{row['seconds']:.2f}", row.get("peak_gb", "-"),
         row.get("max_logit_difference_vs_one_device", "-"), row.get("max_abs_logit", "-"), row.get("same_top1", "-"),
         row.get("time_vs_one_device", "-")] for row in rows])


if __name__ == "__main__":
    main()
