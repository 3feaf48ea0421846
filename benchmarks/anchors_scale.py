"""Thought-anchor salience (``thought_anchors(method="sparse")``, block mass) at long contexts, from
synthetic patterns: does its cost stay linear in T (issue 10, item 5)?

    python3 benchmarks/anchors_scale.py --out $OUT/anchors_scale.json                          # one GPU
    python3 benchmarks/anchors_scale.py --device cpu --lengths 131072 1048576 --layers 2       # CPU

No model: per length, ``--layers`` random causal patterns of the Qwen2.5-1.5B attention shape (12
heads, 64-token blocks, top_k 16; a sink, the diagonal and random earlier blocks kept, random
masses) on ``--device``, and the synthetic sentences of ``benchmarks/analyses_at_length.py``
(30-50 tokens each). Per length: median seconds per layer of ``vertical_scores_sparse`` (step 1-2
of the method, the part that grows with T) and of ``pattern.pruned_fraction``, seconds of the
whole ``thought_anchors`` call and its peak GPU memory; off the CPU, layer 0's vertical scores
recomputed from a CPU copy of its pattern (``cpu_max_rel_diff``: same result on both devices).
Prints a table and writes JSON (after every length).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.analyses_at_length import synthetic_sentences  # noqa: E402
from benchmarks.common import command, config, environment, print_table, save_json  # noqa: E402
from sparse_lens.analysis.anchors.salience import thought_anchors, vertical_scores_sparse  # noqa: E402
from sparse_lens.pattern import BlockSparsePattern  # noqa: E402


def random_pattern(seq_len: int, block: int, top_k: int, heads: int, device: str, seed: int) -> BlockSparsePattern:
    """Distinct causal kept blocks per row, ascending, ``-1`` padded (rows that drew a block twice
    keep fewer): block 0 (a sink), the diagonal block and ``top_k - 2`` random earlier ones; random
    masses summing to 1 per row (sparse mode)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    n_rows = -(-seq_len // block)
    rows = torch.arange(n_rows, device=device)[:, None]
    picks = (torch.rand(heads, n_rows, top_k, generator=generator, device=device) * (rows + 1)).long()
    picks[..., 0], picks[..., -1] = 0, rows[:, 0]
    picks = picks.sort(-1).values
    repeated = torch.cat([torch.zeros_like(picks[..., :1], dtype=torch.bool), picks[..., 1:] == picks[..., :-1]], -1)
    keyed = picks.masked_fill(repeated, n_rows).sort(-1).values  # repeats last, as -1
    indices = keyed.masked_fill(keyed == n_rows, -1)
    mass = torch.rand(heads, n_rows, top_k, generator=generator, device=device).masked_fill(indices < 0, 0)
    mass = mass / mass.sum(-1, keepdim=True)
    return BlockSparsePattern(indices[None], mass[None], torch.zeros(1, heads, seq_len, device=device), seq_len,
                              block, block, scale=1.0)


def seconds(work, device: str, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``work()`` over ``repeats`` calls (synchronised on CUDA), and its last value."""
    times, result = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = work()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure(length: int, args: argparse.Namespace) -> dict:
    device = args.device
    patterns = [random_pattern(length, args.block, args.top_k, args.heads, device, seed=layer)
                for layer in range(args.layers)]
    sentences = synthetic_sentences(length)
    row: dict = {"length": length, "n_sentences": len(sentences), "layers": args.layers}
    per_layer, scores = seconds(lambda: [vertical_scores_sparse(p, sentences) for p in patterns], device, args.repeats)
    row["vertical_scores_s_per_layer"] = per_layer / args.layers
    pruned, _ = seconds(lambda: [p.pruned_fraction() for p in patterns], device, args.repeats)
    row["pruned_fraction_s_per_layer"] = pruned / args.layers
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    row["thought_anchors_s"], anchors = seconds(lambda: thought_anchors(patterns, sentences, method="sparse"), device, 1)
    if device.startswith("cuda"):
        row["thought_anchors_extra_gpu_gb"] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    row["top_anchors"] = anchors.anchors(3)
    if device != "cpu":
        on_cpu = vertical_scores_sparse(patterns[0].to("cpu"), sentences)
        scored = ~torch.isnan(on_cpu)
        difference = (scores[0] - on_cpu).abs()[scored] / on_cpu.abs()[scored].clamp(min=1e-30)
        row["cpu_max_rel_diff"] = float(difference.max())
        row["cpu_same_nan"] = bool(torch.equal(torch.isnan(scores[0]), ~scored))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("anchors_scale.json"))
    args = parser.parse_args(argv)
    result = environment(args.device, triton=False) | {"command": command("anchors_scale.py"), "config": config(args),
                                                       "threads": torch.get_num_threads(), "rows": []}
    for length in args.lengths:
        result["rows"].append(measure(length, args))
        print(result["rows"][-1], flush=True)
        save_json(args.out, result)
    print(f"\nthought_anchors(method='sparse'), random patterns, {args.heads} heads, {args.block}-token blocks, "
          f"top_k {args.top_k}, {args.layers} layers, {result['device']}, {result['threads']} threads")
    print_table(["tokens", "sentences", "vertical scores s/layer", "pruned_fraction s/layer", "thought_anchors s",
                 "extra GPU GB", "vs CPU (max rel)"],
                [[f"{r['length']:,}", f"{r['n_sentences']:,}", f"{r['vertical_scores_s_per_layer']:.3f}",
                  f"{r['pruned_fraction_s_per_layer']:.3f}", f"{r['thought_anchors_s']:.2f}",
                  f"{r['thought_anchors_extra_gpu_gb']:.2f}" if "thought_anchors_extra_gpu_gb" in r else "-",
                  f"{r['cpu_max_rel_diff']:.1e}" if "cpu_max_rel_diff" in r else "-"] for r in result["rows"]])
    return result["rows"]


if __name__ == "__main__":
    main()
