"""Block-selection estimators against the paper-faithful Stream estimator, at equal budget, on the
default model (SmolLM2-135M-Instruct, CPU).

    python benchmarks/estimators.py --length 2048
    nohup python benchmarks/estimators.py --length 8192 > est8k.log 2>&1 &

One dense (observe-mode) run holds every layer's rotated q, k and dense lse; every estimator is
then run per layer on those tensors (no model rerun) for each block size (query = key block)
and each budget. Budgets are equal in pruned fraction across block sizes: for each target
(``--pruned``, default ~88% and ~94%) the ``top_k`` whose pruned fraction is nearest.
Per (estimator, block, budget), over all layers and heads:
- ``pruned``: 1 - kept query-key pairs / causal pairs;
- ``recall`` mean and p5: dense softmax mass in the kept blocks (gathered from the dense block
  mass), over the query blocks where pruning happens (they see more than top_k key blocks);
- ``oracle``: recall of the exact top-k blocks by dense mass, and ``ratio`` = recall / oracle;
- ``seconds``: CPU time of the estimator calls (wall clock, shared 2-core machine), and
  ``gflop``: a FLOP count of the estimator's scoring (formulas in ``estimator_flops``), also as a
  share of one dense causal ``q k^T`` (``H T^2 D`` FLOPs per layer).
Adaptive rows (``adaptive_estimate``, p in ``--p``) report the same with their own pruned
fraction, over query blocks that see more than ``min_blocks`` key blocks, beside the exact
top-p oracle (smallest set of dense blocks reaching p, same floor, no cap).
``--kl`` then runs the model sparsely for a few estimators at one budget (estimates made on
the sparse run's own q, k through a ``hook_pattern`` hook) and reports next-token KL / top-1.
Writes JSON to benchmarks/results/estimators_smollm2_<length>.json (after every layer, so a
partial run leaves its figures) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.* when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sparse_lens as sl  # noqa: E402
from benchmarks.fidelity import load_dense_timed  # noqa: E402
from sparse_lens.data import prose_tokens  # noqa: E402
from sparse_lens.kernels.oneshot import antidiagonal_estimate, oneshot_pooled_estimate  # noqa: E402
from sparse_lens.kernels.rescore import (  # noqa: E402
    adaptive_candidates, adaptive_estimate, rescored_estimate, select_top_p,
)
from sparse_lens.kernels.search import bounds_estimate, pooled_estimate  # noqa: E402
from sparse_lens.kernels.blocks import (  # noqa: E402
    causal_pairs, fixed_blocks, kept_pairs_per_slot, num_blocks, pad_to_blocks, visible_key_blocks,
)
from sparse_lens.kernels.stream import stream_estimate  # noqa: E402
from sparse_lens.kernels.exact_block_mass import dense_block_masses  # noqa: E402

SINK, LOCAL = 1, 1
REPRESENTATIVE_KEYS = 8
ANTIDIAGONAL_STRIDE = 8
RESCORE_QUERY_STRIDE = 4  # rescored_beam4_qs4 and the adaptive exact mass use every 4th query
DEFAULT_ESTIMATORS_8K = ["stream", "pooled", "bounds", "oneshot_pooled", "antidiagonal", "rescored_beam2",
                         "rescored_beam4_qs4"]


def estimators(scale: float) -> dict:
    """name -> f(query, key, block, top_k) -> block indices. ``stream`` is the paper-faithful baseline."""
    fixed = dict(sink_blocks=SINK, local_blocks=LOCAL)

    def call(fn, **extra):
        return lambda q, k, block, top_k: fn(q, k, query_block=block, key_block=block, top_k=top_k, **fixed, **extra)

    return {
        "stream": call(stream_estimate, representative_keys=REPRESENTATIVE_KEYS),
        "pooled": call(pooled_estimate),
        "pooled_meanq": call(pooled_estimate, query_stride=0, mean_query=True),
        "bounds": call(bounds_estimate),
        "oneshot_pooled": call(oneshot_pooled_estimate),
        "antidiagonal": call(antidiagonal_estimate, stride=ANTIDIAGONAL_STRIDE),
        "antidiagonal_softmax": call(antidiagonal_estimate, stride=ANTIDIAGONAL_STRIDE, normalize="softmax",
                                     scale=scale),
        "rescored_beam2": call(rescored_estimate, beam=2, scale=scale),
        "rescored_beam4": call(rescored_estimate, beam=4, scale=scale),
        "rescored_beam4_qs4": call(rescored_estimate, beam=4, scale=scale, query_stride=RESCORE_QUERY_STRIDE),
        # the StreamConfig default: Stream's search for the candidates (runs on the Triton kernels)
        "rescored_stream_beam4": call(rescored_estimate, beam=4, scale=scale, search="stream",
                                      representative_keys=REPRESENTATIVE_KEYS),
    }


def stream_rescore_settings(name: str) -> dict | None:
    """``rescored_stream_beamB[_rkR][_qsS]`` -> ``{beam, representative_keys, query_stride}``
    (Stream's search with R representative keys, default 8; exact masses on every S-th query,
    default 1), the variants the fused Triton rescoring runs; ``None`` for other names."""
    match = re.fullmatch(r"rescored_stream_beam(\d+)(?:_rk(\d+))?(?:_qs(\d+))?", name)
    if match is None:
        return None
    beam, keys, stride = match.groups()
    return {"beam": int(beam), "representative_keys": int(keys or REPRESENTATIVE_KEYS), "query_stride": int(stride or 1)}


def estimator_fns(names, scale: float) -> dict:
    """``estimators(scale)`` plus every ``rescored_stream_beamB[_rkR][_qsS]`` name in ``names``."""
    fns = estimators(scale)
    for name in names:
        settings = stream_rescore_settings(name)
        if name not in fns and settings is not None:
            fns[name] = lambda q, k, block, top_k, settings=settings: rescored_estimate(
                q, k, query_block=block, key_block=block, top_k=top_k, sink_blocks=SINK, local_blocks=LOCAL,
                search="stream", scale=scale, **settings)
    return fns


def estimator_flops(name: str, *, seq_len: int, block: int, top_k: int, heads: int, d_head: int) -> float:
    """Scoring FLOPs of one layer (all query heads), 2 per multiply-add.

    Hierarchical (per searched query block, R rounds of 2 n_search candidates):
    stream 2 R C bq r D (r representative keys), pooled 2 R C bq D, pooled_meanq 2 R C D,
    bounds 4 R C bq D (centre and radius matmuls). One-shot, over causal block pairs P:
    oneshot_pooled 2 P D; antidiagonal 2 (causal stride tiles) S D ~ T^2 D / S.
    rescored_beamB: bounds at top_k' = sink + local + B n_search, plus exact logits of the
    B n_search candidates, 2 B n_search bq bk D per searched query block (/ 4 for _qs4).
    """
    settings = stream_rescore_settings(name)
    if settings is not None:
        beam, n_search = settings["beam"], top_k - SINK - LOCAL
        searched = int((visible_key_blocks(seq_len, block, block) > top_k).sum())
        search = estimator_flops("stream", seq_len=seq_len, block=block, top_k=SINK + LOCAL + beam * n_search,
                                 heads=heads, d_head=d_head) * settings["representative_keys"] / REPRESENTATIVE_KEYS
        rescore = 2.0 * heads * searched * (SINK + LOCAL + beam * n_search) * block * block * d_head
        return search + rescore / settings["query_stride"]
    if name.startswith("rescored_beam"):
        beam, _, strided = name.removeprefix("rescored_beam").partition("_qs")
        beam, query_share = int(beam), 1 / int(strided or 1)
        n_search = top_k - SINK - LOCAL
        wide = SINK + LOCAL + beam * n_search
        searched = int((visible_key_blocks(seq_len, block, block) > top_k).sum())
        search = estimator_flops("bounds", seq_len=seq_len, block=block, top_k=wide, heads=heads, d_head=d_head)
        return search + 2.0 * heads * searched * beam * n_search * block * block * d_head * query_share
    n_visible = visible_key_blocks(seq_len, block, block)
    searched = int((n_visible > top_k).sum())
    n_search = top_k - SINK - LOCAL
    widest = num_blocks(seq_len, block) - SINK - LOCAL
    rounds = max(1, math.ceil(math.log2(max(2, -(-widest // max(n_search, 1))))))
    candidates = 2 * n_search * rounds * searched
    per_candidate = {"stream": block * REPRESENTATIVE_KEYS * d_head, "pooled": block * d_head,
                     "pooled_meanq": d_head, "bounds": 2 * block * d_head}
    if name in per_candidate:
        return 2.0 * heads * candidates * per_candidate[name]
    if name == "oneshot_pooled":
        return 2.0 * heads * float(n_visible.sum()) * d_head
    if name.startswith("antidiagonal"):
        tiles = num_blocks(seq_len, ANTIDIAGONAL_STRIDE)
        return 2.0 * heads * tiles * (tiles + 1) / 2 * ANTIDIAGONAL_STRIDE * d_head
    raise KeyError(name)


def adaptive_flops(estimate: str, *, seq_len: int, block: int, max_blocks: int, heads: int, d_head: int) -> float:
    """Bounds search at top_k = max_blocks, plus the mass estimate per query block: exact,
    2 (bq / 4) max_blocks bk D; pooled, 2 bq max_blocks D plus the exact sink / local 2 bq (s + l) bk D."""
    search = estimator_flops("bounds", seq_len=seq_len, block=block, top_k=max_blocks, heads=heads, d_head=d_head)
    if estimate == "exact":  # every RESCORE_QUERY_STRIDE-th query against every candidate's keys
        per_query_block = block // RESCORE_QUERY_STRIDE * max_blocks * block
    else:
        per_query_block = block * (max_blocks + (SINK + LOCAL) * block)
    return search + 2.0 * heads * num_blocks(seq_len, block) * d_head * per_query_block


def pruned_fraction(block_indices: torch.Tensor, seq_len: int, block: int) -> float:
    kept = kept_pairs_per_slot(block_indices, seq_len, block, block).sum()
    heads = block_indices.shape[0] * block_indices.shape[1]
    return 1.0 - float(kept) / (causal_pairs(seq_len) * heads)


def window_pruned_fraction(seq_len: int, block: int, top_k: int) -> float:
    """Pruned fraction of any selection keeping the diagonal and top_k - 1 full blocks (all do)."""
    n_visible = visible_key_blocks(seq_len, block, block)
    indices = n_visible[:, None] - top_k + torch.arange(top_k)
    indices = torch.where(indices >= 0, indices, torch.full_like(indices, -1))
    return pruned_fraction(indices[None, None], seq_len, block)


def budget_top_k(seq_len: int, block: int, target: float) -> int:
    """top_k (>= sink + local + 1) whose pruned fraction is nearest ``target``."""
    n_key_blocks = num_blocks(seq_len, block)
    options = range(SINK + LOCAL + 1, n_key_blocks + 1)
    return min(options, key=lambda k: abs(window_pruned_fraction(seq_len, block, k) - target))


def kept_mass(block_mass: torch.Tensor, block_indices: torch.Tensor) -> torch.Tensor:
    """Dense mass in the kept blocks per (batch, head, query block)."""
    gathered = block_mass.gather(-1, block_indices.clamp(min=0))
    return (gathered * (block_indices >= 0)).sum(-1)


def oracle_top_p(block_mass: torch.Tensor, p: float, min_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-p: smallest set of dense blocks reaching ``p`` (at least min_blocks): (indices, recall)."""
    sorted_mass, order = block_mass.sort(-1, descending=True)
    before = sorted_mass.cumsum(-1) - sorted_mass
    n_keep = (before < p).sum(-1, keepdim=True).clamp(min=min_blocks)
    slot = torch.arange(block_mass.shape[-1])
    visible = (block_mass > 0).sum(-1, keepdim=True)  # causal blocks carry mass > 0
    n_keep = torch.minimum(n_keep, visible.clamp(min=1))
    indices = torch.where(slot < n_keep, order, torch.full_like(order, -1))
    return indices, (sorted_mass * (slot < n_keep)).sum(-1)


FIXED_SLOT_ORACLE = "oracle_sink_local_fixed"


def fixed_slot_oracle(block_mass: torch.Tensor, n_visible: torch.Tensor, top_k: int) -> torch.Tensor:
    """Recall of the best selection that keeps the sink and local blocks (as every estimator here
    does) plus the ``top_k - sink - local`` heaviest other blocks: the ceiling of their recall.
    Its ``oracle_ratio`` says how much of the exact top-k oracle is reachable with fixed slots."""
    fixed = fixed_blocks(n_visible, SINK, LOCAL)[None, None].expand(*block_mass.shape[:2], -1, -1)
    fixed = fixed.clamp(min=0, max=block_mass.shape[-1] - 1)
    fixed_mass = (block_mass.gather(-1, fixed).sum(-1) if fixed.shape[-1] else 0.0)
    rest = block_mass.scatter(-1, fixed, 0.0) if fixed.shape[-1] else block_mass
    return fixed_mass + rest.topk(max(top_k - SINK - LOCAL, 0), dim=-1).values.sum(-1)


class Accumulator:
    """Per-row recalls, pruned fractions and timings over layers, for one table row."""

    def __init__(self) -> None:
        self.recall, self.oracle, self.pruned, self.seconds, self.flops = [], [], [], 0.0, 0.0

    def add(self, recall, oracle, pruned, seconds=0.0, flops=0.0):
        self.recall.append(recall.flatten())
        self.oracle.append(oracle.flatten())
        self.pruned.append(pruned)
        self.seconds += seconds
        self.flops += flops

    def summary(self, dense_flops: float) -> dict:
        recall, oracle = torch.cat(self.recall).double(), torch.cat(self.oracle).double()
        return {
            "pruned": float(np.mean(self.pruned)),
            "recall_mean": float(recall.mean()),
            "recall_p5": float(torch.quantile(recall, 0.05)),
            "oracle_mean": float(oracle.mean()),
            "oracle_p5": float(torch.quantile(oracle, 0.05)),
            "oracle_ratio": float(recall.mean() / oracle.mean()),
            "seconds": self.seconds,
            "gflop": self.flops / 1e9,
            "flop_share_of_dense_qk": self.flops / dense_flops if dense_flops else None,
            "rows": int(recall.numel()),
        }


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def evaluate_layers(dense, args, plan, results_path, meta) -> dict:
    seq_len = dense.query[0].shape[2]
    heads, d_head = dense.query[0].shape[1], dense.query[0].shape[3]
    fns = estimator_fns(args.estimators, dense.scale)
    names = [n for n in fns if n in args.estimators]
    acc = {key: Accumulator() for key in plan_keys(plan, names, args)}
    n_layers = len(dense.query) if args.layers is None else args.layers
    dense_flops_per_layer = heads * seq_len**2 * d_head
    for layer in range(n_layers):
        layer_started = time.perf_counter()
        q, k = dense.query[layer], dense.key[layer]
        all_masses = dense_block_masses(q, k, dense.lse[layer], args.blocks, scale=dense.scale)
        for block in args.blocks:
            mass = all_masses.pop(block)
            n_visible = visible_key_blocks(seq_len, block, block)
            for top_k in sorted(set(plan[block].values())):
                rows = n_visible > top_k
                oracle = mass.topk(min(top_k, mass.shape[-1]), dim=-1).values.sum(-1)[:, :, rows]
                for name in names:
                    indices, seconds = timed(fns[name], q, k, block, top_k)
                    flops = estimator_flops(name, seq_len=seq_len, block=block, top_k=top_k, heads=heads, d_head=d_head)
                    acc[("fixed", name, block, top_k)].add(kept_mass(mass, indices)[:, :, rows], oracle,
                                                           pruned_fraction(indices, seq_len, block), seconds, flops)
                acc[("fixed", FIXED_SLOT_ORACLE, block, top_k)].add(
                    fixed_slot_oracle(mass, n_visible, top_k)[:, :, rows], oracle,
                    window_pruned_fraction(seq_len, block, top_k))
            for max_blocks, estimate in adaptive_variants(plan, block, args):
                (cands, cmass, keep), seconds = timed(functools.partial(
                    adaptive_candidates, query_block=block, key_block=block, max_blocks=max_blocks,
                    sink_blocks=SINK, local_blocks=LOCAL, estimate=estimate, scale=dense.scale,
                    query_stride=RESCORE_QUERY_STRIDE if estimate == "exact" else 1), q, k)
                rows = n_visible > args.min_blocks
                flops = adaptive_flops(estimate, seq_len=seq_len, block=block, max_blocks=max_blocks, heads=heads,
                                       d_head=d_head)
                for p in args.p:
                    indices, select_seconds = timed(functools.partial(
                        select_top_p, p=p, min_blocks=args.min_blocks), cands, cmass, keep)
                    _, oracle = oracle_top_p(mass, p, args.min_blocks)
                    acc[("adaptive", f"{estimate} mass, cap {max_blocks}", block, p)].add(
                        kept_mass(mass, indices)[:, :, rows], oracle[:, :, rows],
                        pruned_fraction(indices, seq_len, block), seconds + select_seconds, flops)
            for p in args.p:  # exact top-p oracle's own pruned fraction (reference point, no cap)
                indices, oracle = oracle_top_p(mass, p, args.min_blocks)
                rows = n_visible > args.min_blocks
                acc[("oracle_top_p", None, block, p)].add(oracle[:, :, rows], oracle[:, :, rows],
                                                          pruned_fraction(indices, seq_len, block))
            del mass
        done = layer + 1
        print(f"layer {layer} done in {time.perf_counter() - layer_started:.1f} s", flush=True)
        table = {str(key): {"kind": key[0], "estimator": key[1], "block": key[2],
                            ("top_k" if key[0] == "fixed" else "p"): key[3],
                            **a.summary(dense_flops_per_layer * done)} for key, a in acc.items()}
        results = {**meta, "layers_done": done, "rows": list(table.values())}
        results_path.write_text(json.dumps(results, indent=2))
    return results


def plan_keys(plan, names, args):
    keys = []
    for block in args.blocks:
        for top_k in sorted(set(plan[block].values())):
            keys += [("fixed", name, block, top_k) for name in [*names, FIXED_SLOT_ORACLE]]
        for max_blocks, estimate in adaptive_variants(plan, block, args):
            keys += [("adaptive", f"{estimate} mass, cap {max_blocks}", block, p) for p in args.p]
        keys += [("oracle_top_p", None, block, p) for p in args.p]
    return keys


def adaptive_variants(plan, block, args) -> list[tuple[int, str]]:
    """(cap, mass estimate) per ``--adaptive ESTIMATE:FACTOR``: cap = FACTOR x the loosest fixed
    budget at this block size."""
    if not args.p:
        return []
    variants = []
    for spec in args.adaptive:
        estimate, factor = spec.split(":")
        variants.append((int(factor) * max(plan[block].values()), estimate))
    return variants


def kl_estimator(name: str, scale: float, min_blocks: int):
    """``f(q, k, block, top_k)`` for a --kl name: an entry of ``estimators`` or
    ``adaptive:P:CAP`` (adaptive_estimate, bounds search, exact mass on every 4th query)."""
    if not name.startswith("adaptive:"):
        return estimator_fns([name], scale)[name]
    _, p, cap = name.split(":")
    return lambda q, k, block, top_k: adaptive_estimate(
        q, k, query_block=block, key_block=block, p=float(p), min_blocks=min_blocks, max_blocks=int(cap),
        sink_blocks=SINK, local_blocks=LOCAL, estimate="exact", scale=scale, query_stride=RESCORE_QUERY_STRIDE)


@torch.no_grad()
def next_token_runs(model, tokens, dense, args, plan) -> list[dict]:
    """Sparse model runs at one budget: stream (no hook) and the others through hook_pattern,
    each estimate made on the sparse run's own rotated q, k."""
    from sparse_lens.analysis.fidelity import first_pruned_position, next_token_figures

    block = args.kl_block
    top_k = plan[block][min(plan[block])] if args.kl_top_k is None else args.kl_top_k
    seq_len = tokens.shape[-1]
    out = []
    for name in args.kl:
        estimate = kl_estimator(name, dense.scale, args.min_blocks) if name != "stream" else None
        settings = dict(query_block=block, key_block=block, top_k=top_k, sink_blocks=SINK, local_blocks=LOCAL,
                        mode="sparse", keep_qk=name != "stream")
        pruned = []

        def hook(pattern, hook, estimate=estimate, pruned=pruned):
            indices = estimate(pattern.query, pattern.key, block, top_k)
            pruned.append(pruned_fraction(indices, seq_len, block))
            return pattern.with_block_indices(indices)

        started = time.perf_counter()
        with model.stream_settings(**settings) as stream:
            hooks = [] if name == "stream" else [
                (f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(model.cfg.n_layers)]
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks).float()
            first = first_pruned_position(stream, seq_len)
        figures = next_token_figures(dense.logits, logits, first_position=first)
        out.append({"estimator": name, "block": block, "top_k": top_k, "seconds": time.perf_counter() - started,
                    "pruned": float(np.mean(pruned)) if pruned else window_pruned_fraction(seq_len, block, top_k),
                    **figures})
        print(json.dumps(out[-1]), flush=True)
    return out


def print_tables(results: dict) -> None:
    rows = results["rows"]
    print(f"\nSmolLM2-135M-Instruct, {results['length']} tokens of prose, sink {SINK}, local {LOCAL}, "
          f"{results['layers_done']} layers, CPU")
    print("\n| block | top_k | estimator | pruned | recall mean | recall p5 | oracle | oracle ratio | "
          "est. s | GFLOP (share of dense qk) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["kind"] == "fixed"), key=lambda r: (r["block"], -r["top_k"])):
        print(f"| {r['block']} | {r['top_k']} | {r['estimator']} | {r['pruned']:.3f} | {r['recall_mean']:.3f} | "
              f"{r['recall_p5']:.3f} | {r['oracle_mean']:.3f} | {r['oracle_ratio']:.3f} | {r['seconds']:.1f} | "
              f"{r['gflop']:.2f} ({100 * r['flop_share_of_dense_qk']:.2f}%) |")
    adaptive = [r for r in rows if r["kind"] in ("adaptive", "oracle_top_p")]
    if adaptive:
        print("\n| block | p | selection | pruned | recall mean | recall p5 | est. s |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(adaptive, key=lambda r: (r["block"], r["p"], r["kind"])):
            what = "exact top-p oracle (no cap)" if r["kind"] == "oracle_top_p" else f"adaptive bounds, {r['estimator']}"
            print(f"| {r['block']} | {r['p']} | {what} | {r['pruned']:.3f} | {r['recall_mean']:.3f} | "
                  f"{r['recall_p5']:.3f} | {r['seconds']:.1f} |")
    if results.get("next_token"):
        print("\n| estimator | block | top_k | pruned | KL (nats) | top-1 | final KL | final top-1 | positions | s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["next_token"]:
            pruned = f"{r['pruned']:.3f}" if "pruned" in r else "-"
            print(f"| {r['estimator']} | {r['block']} | {r['top_k']} | {pruned} | {r['next_token_kl']:.4f} | "
                  f"{r['top1_agreement']:.3f} | {r['final_kl']:.4f} | {r['final_top1']:.0f} | "
                  f"{r['positions_scored']} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--pruned", type=float, nargs="+", default=[0.88, 0.94], help="target pruned fractions")
    parser.add_argument("--estimators", nargs="+", default=None,
                        help="default: all at <= 4096 tokens, DEFAULT_ESTIMATORS_8K above (CPU time)")
    parser.add_argument("--p", type=float, nargs="*", default=[0.8, 0.9, 0.95], help="adaptive top-p targets")
    parser.add_argument("--min-blocks", type=int, default=4)
    parser.add_argument("--adaptive", nargs="*", default=["exact:2", "exact:4", "pooled:2"],
                        help="ESTIMATE:FACTOR, mass estimate (exact or pooled) and cap = FACTOR x loosest top_k")
    parser.add_argument("--layers", type=int, default=None, help="first N layers only (debugging)")
    parser.add_argument("--kl", nargs="*", default=[],
                        help="estimators to run the model sparsely with (or adaptive:P:CAP)")
    parser.add_argument("--kl-block", type=int, default=64)
    parser.add_argument("--kl-top-k", type=int, default=None, help="default: the loosest budget at --kl-block")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dense-cache", type=Path, default=None, help="save / reuse the dense trace here")
    parser.add_argument("--skip-recall", action="store_true",
                        help="only the --kl runs, added to the existing JSON (needs --dense-cache to be quick)")
    args = parser.parse_args()
    if args.estimators is None:
        args.estimators = list(estimators(1.0)) if args.length <= 4096 else DEFAULT_ESTIMATORS_8K
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(f"benchmarks/results/estimators_smollm2_{args.length}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    from sparse_lens.tl.loading import load_hf_model, resolve_model_source

    hf_model, tokenizer = load_hf_model(resolve_model_source(sl.DEFAULT_MODEL))
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, tokenizer, sl.StreamConfig())
    tokens = torch.tensor([prose_tokens(tokenizer, args.length)])
    # fidelity.py's --dense-cache: every DenseTrace field (window, soft-cap, sinks, fingerprint)
    dense, dense_seconds = load_dense_timed(model, tokens, args.dense_cache)

    plan = {block: {target: budget_top_k(args.length, block, target) for target in args.pruned}
            for block in args.blocks}
    print("budgets (target pruned -> top_k):", plan, flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores (shared, no GPU)",
            "torch_threads": torch.get_num_threads(), "length": args.length, "sink_blocks": SINK,
            "local_blocks": LOCAL, "representative_keys": REPRESENTATIVE_KEYS,
            "antidiagonal_stride": ANTIDIAGONAL_STRIDE, "min_blocks": args.min_blocks,
            "adaptive": args.adaptive, "budgets": {str(b): {str(t): k for t, k in v.items()} for b, v in plan.items()},
            "dense_observe_seconds": dense_seconds, "command": "python benchmarks/estimators.py " + " ".join(sys.argv[1:])}
    if args.skip_recall:
        results = json.loads(out.read_text())
    else:
        results = evaluate_layers(dense, args, plan, out, meta)
    if args.kl:
        results["next_token"] = results.get("next_token", []) + next_token_runs(model, tokens, dense, args, plan)
        out.write_text(json.dumps(results, indent=2))
    print_tables(results)


if __name__ == "__main__":
    main()
