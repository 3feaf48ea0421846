"""Alternative block-selection estimators, torch references, measured against the Stream estimator.

Every estimator here has the output contract of ``stream_estimate`` (``estimator_ref.py``):
int64 ``[batch, q_head, n_query_blocks, top_k]`` kept key blocks per query block, ascending,
``-1`` in unused slots at the end of a row; a query block that sees ``<= top_k`` causal key blocks
keeps them all; ``sink_blocks`` (sequence start) and ``local_blocks`` (ending at the diagonal) are
always kept and counted inside ``top_k``; the remaining ``n_search = top_k - sink - local`` are
chosen among the key blocks in between (the *searched range*). Inputs are rotated queries
``[B, Hq, T, D]`` and keys ``[B, Hkv, T, D]``; query head ``h`` reads key head ``h // group``
(GQA); one of ``query_block`` / ``key_block`` divides the other; ``T`` need not be a multiple of
either. Costs below are per (batch, query head); ``n_kb = T / key_block``, ``n_qb = T / query_block``,
``R = ceil(log2(n_kb / n_search))`` refinement rounds.

Hierarchical refinement (same binary-search structure as Stream: ``n_search`` branches, every
round splits each branch in two and keeps the best ``n_search`` halves), differing only in how a
candidate half, a contiguous key-block range, is scored:

- :func:`pooled_estimate`: by ``max_i q_i . mean_key(range)`` over the query block's queries
  (optionally strided, optionally with the block's mean query added). Mean keys of any range
  come in O(1) from a prefix sum over per-block key sums (``[n_kb + 1, D]`` per key head).
  Time O(n_qb * R * 2 n_search * query_block * D) (8x fewer FLOPs than Stream's default of 8
  representative keys), memory O(n_kb * D) per key head, plus the O(T) index list.
- :func:`bounds_estimate` (Quest-style branch and bound): by the upper bound
  ``max_i sum_d max(q_id * kmax_d, q_id * kmin_d)`` where ``kmin`` / ``kmax`` are the elementwise
  min / max of every key in the range, read in O(1) from a sparse table (range min / max over
  blocks, ``O(n_kb log n_kb D)`` memory per key head, built once per call). Written as
  ``q . centre + |q| . radius`` it costs two matmuls: 2x the pooled FLOPs.

One-shot baselines, which score every causal (query block, key block) pair and take the top
``n_search`` of the searched range: O(n_qb * n_kb) scores per head, i.e. O((T / block)^2) memory,
not O(T log T):

- :func:`oneshot_pooled_estimate` (MInference / FlexPrefill style): mean query of each query
  block . mean key of each key block. Time O(n_qb * n_kb * D).
- :func:`antidiagonal_estimate` (after the XAttention paper's description): the sum of ``q . k``
  over the antidiagonals of stride ``S`` inside each block pair (every S-th antidiagonal:
  positions with ``(i + j) % S == S - 1``), optionally softmax-normalised per strided row.
  Time O(T^2 D / S), memory O((T / S)^2).

Two-stage (added after measuring the above; see benchmarks/estimators.py):

- :func:`rescored_estimate`: the bounds search (or pooled) keeps ``beam * n_search`` candidate
  blocks, then each candidate's *exact* block log-sum-exp is computed per query (every
  ``query_stride``-th query), turned into a per-query softmax over candidates + sink + local,
  averaged over the block's queries, and the ``n_search`` heaviest are kept. Time: the search at
  ``top_k' = sink + local + beam * n_search`` plus O(n_qb * beam * n_search * (query_block /
  query_stride) * key_block * D), i.e. attention logits over the candidates; memory O(T).
  With pooled statistics alone (mean keys, with or without variance, exhaustive or
  hierarchical) no score reached more than ~0.95 of the exact top-k oracle's recall on the
  default model: heads that attend to a few specific keys need token-level scores.

Adaptive budget: :func:`adaptive_estimate` runs the bounds (or pooled) search with ``top_k =
max_blocks`` candidates and keeps, per (head, query block), the smallest set of the heaviest
candidates whose estimated mass reaches ``p`` (at least ``min_blocks``, at most ``max_blocks``;
sink and local blocks always kept and counted). The estimated mass of a candidate is a per-query
softmax over the candidates' block log-masses, averaged over the block's queries, with the
log-masses either exact (``estimate="exact"``, the rescoring above) or the mean-key estimate
``scale * q . mean_key(b) + log n_b`` (``"pooled"``; the first-order approximation of the block's
log-sum-exp, a lower bound by Jensen; sink and local blocks exact). The shares are normalised over
the candidates: mass in blocks the search discarded is not counted, so ``p`` is a knob and the
kept dense mass is lower when the candidates miss mass. Output width ``max_blocks``, ``-1`` in
unused slots.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import (
    UNUSED_SLOT,
    num_blocks,
    pad_to_blocks,
    query_blocks_per_chunk,
    sort_block_row,
    visible_key_blocks,
)
from sparse_lens.kernels.checks import check_attention_inputs

# A range scorer: (query blocks of a chunk, their ids, candidate [start, end) key-block ranges)
# -> a score per candidate, -inf for empty ranges. Higher is better.
RangeScorer = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
EstimatorName = Literal["pooled", "bounds"]


# ---------------------------------------------------------------------------------------------
# Shared geometry
# ---------------------------------------------------------------------------------------------
def split_into_blocks(tensor: Float[Tensor, "batch head seq d"], block: int) -> Float[Tensor, "batch head n block d"]:
    """Zero-pad the sequence to whole blocks and split it: [batch, head, n_blocks, block, d]."""
    n = num_blocks(tensor.shape[2], block)
    return pad_to_blocks(tensor.float(), block).unflatten(2, (n, block))


def tokens_per_block(seq_len: int, block: int, device: torch.device | None = None) -> Int[Tensor, "n_blocks"]:
    """Real (unpadded) tokens in each block: ``block`` except possibly the last."""
    first = torch.arange(num_blocks(seq_len, block), device=device) * block
    return (seq_len - first).clamp(max=block)


def real_query_mask(block_ids: Int[Tensor, "chunk"], query_block: int, seq_len: int) -> Bool[Tensor, "chunk query_block"]:
    """Which query slots of the given query blocks are real positions (< seq_len)."""
    positions = block_ids[:, None] * query_block + torch.arange(query_block, device=block_ids.device)
    return positions < seq_len


def kv_head_index(n_q_heads: int, n_kv_heads: int, device: torch.device) -> Int[Tensor, "q_head"]:
    """GQA: the key head each query head reads."""
    return torch.arange(n_q_heads, device=device) // (n_q_heads // n_kv_heads)


def gather_per_head(
    table: Float[Tensor, "batch kv_head n ..."], index: Int[Tensor, "batch q_head *rest"]
) -> Tensor:
    """``table[b, h // group, index[b, h, ...]]`` for every query head ``h`` (GQA gather)."""
    batch, n_q_heads = index.shape[:2]
    kv_head = kv_head_index(n_q_heads, table.shape[1], index.device)
    extra = (None,) * (index.dim() - 2)
    batch_idx = torch.arange(batch, device=index.device)[(slice(None), None) + extra]
    return table[batch_idx, kv_head[(None, slice(None)) + extra], index]


def fixed_blocks(
    n_visible: Int[Tensor, "rows"], sink_blocks: int, local_blocks: int
) -> Int[Tensor, "rows n_fixed"]:
    """The always-kept key blocks of each row: ``[0, sink)`` then ``[n_visible - local, n_visible)``."""
    slot = torch.arange(sink_blocks + local_blocks, device=n_visible.device)
    sinks = slot[:sink_blocks].expand(len(n_visible), sink_blocks)
    locals_ = n_visible[:, None] - local_blocks + slot[:local_blocks]
    return torch.cat([sinks, locals_], dim=-1)


def keep_all_rows(n_visible: Int[Tensor, "rows"], width: int) -> Int[Tensor, "rows width"]:
    """Rows that keep every visible key block: ``0 .. n_visible - 1`` then ``-1``."""
    slot = torch.arange(width, device=n_visible.device)
    return torch.where(slot < n_visible[:, None], slot, torch.full_like(slot, UNUSED_SLOT))


def first_searched_block(seq_len: int, query_block: int, key_block: int, top_k: int) -> int:
    """First query block that sees more than ``top_k`` key blocks (a Python int)."""
    n_visible = visible_key_blocks(seq_len, query_block, key_block)
    rows = torch.nonzero(n_visible > top_k)
    return int(rows[0]) if len(rows) else len(n_visible)


def check_estimator_settings(query_block: int, key_block: int, top_k: int, sink_blocks: int, local_blocks: int) -> None:
    if query_block % key_block and key_block % query_block:
        raise ValueError(f"query_block={query_block} and key_block={key_block}: one must divide the other.")
    if top_k < 1 or sink_blocks < 0 or local_blocks < 0 or sink_blocks + local_blocks > top_k:
        raise ValueError(f"need top_k >= 1 and 0 <= sink_blocks + local_blocks <= top_k, got "
                         f"top_k={top_k}, sink_blocks={sink_blocks}, local_blocks={local_blocks}.")


# ---------------------------------------------------------------------------------------------
# Hierarchical refinement (the Stream search, with a pluggable range score)
# ---------------------------------------------------------------------------------------------
def hierarchical_search(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    score_ranges: RangeScorer,
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    bytes_per_candidate: int,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Stream's binary-search refinement, scoring candidate key-block ranges with ``score_ranges``.

    ``score_ranges(query_blocks, block_ids, cand_start, cand_end)`` gets the chunk's query blocks
    ``[B, Hq, chunk, query_block, D]``, their ids ``[chunk]`` and candidate ranges
    ``[B, Hq, chunk, n_cand]`` and returns ``[B, Hq, chunk, n_cand]`` scores (``-inf`` for
    empty ranges). With ``score_branches_by_center_block`` it is ``stream_estimate``.
    """
    batch, n_q_heads, seq_len, _ = query.shape
    n_query_blocks = num_blocks(seq_len, query_block)
    n_key_blocks = num_blocks(seq_len, key_block)
    n_search = top_k - sink_blocks - local_blocks
    first_searched = first_searched_block(seq_len, query_block, key_block, top_k)
    widest_range = n_key_blocks - sink_blocks - local_blocks
    n_rounds = max(1, math.ceil(math.log2(max(2, -(-widest_range // max(n_search, 1))))))

    query_blocks: Float[Tensor, "batch q_head n_query_blocks query_block d_head"] = split_into_blocks(query, query_block)
    n_visible: Int[Tensor, "n_query_blocks"] = visible_key_blocks(seq_len, query_block, key_block, device=query.device)
    rows = [keep_all_rows(n_visible[:first_searched], top_k).expand(batch, n_q_heads, first_searched, top_k)]
    chunk = query_blocks_per_chunk(batch * n_q_heads * 2 * max(n_search, 1) * bytes_per_candidate)
    for first in range(first_searched, n_query_blocks, chunk):
        block_ids = torch.arange(first, min(first + chunk, n_query_blocks), device=query.device)
        fixed = fixed_blocks(n_visible[block_ids], sink_blocks, local_blocks).expand(batch, n_q_heads, -1, -1)
        if n_search == 0:
            rows.append(sort_block_row(fixed))
            continue
        start, end = initial_branches(n_visible[block_ids], sink_blocks, local_blocks, n_search)
        start = start.expand(batch, n_q_heads, -1, -1)
        end = end.expand(batch, n_q_heads, -1, -1)
        for _ in range(n_rounds):
            mid = start + (end - start + 1) // 2
            cand_start = torch.cat([start, mid], dim=-1)
            cand_end = torch.cat([mid, end], dim=-1)
            score = score_ranges(query_blocks[:, :, block_ids], block_ids, cand_start, cand_end)
            best = score.topk(n_search, dim=-1).indices
            start = cand_start.gather(-1, best)
            end = cand_end.gather(-1, best)
        rows.append(sort_block_row(torch.cat([fixed, start], dim=-1)))
    return torch.cat(rows, dim=2)


def initial_branches(
    n_visible: Int[Tensor, "rows"], sink_blocks: int, local_blocks: int, n_search: int
) -> tuple[Int[Tensor, "rows n_search"], Int[Tensor, "rows n_search"]]:
    """Split each row's searched range ``[sink, n_visible - local)`` into ``n_search`` equal branches."""
    range_len = n_visible - local_blocks - sink_blocks
    branch = torch.arange(n_search, device=n_visible.device)
    start = sink_blocks + (branch * range_len[:, None]) // n_search
    end = sink_blocks + ((branch + 1) * range_len[:, None]) // n_search
    return start, end


def best_over_queries(
    scores: Float[Tensor, "batch q_head chunk n_cand n_query"],
    real_queries: Bool[Tensor, "chunk n_query"],
    cand_start: Int[Tensor, "batch q_head chunk n_cand"],
    cand_end: Int[Tensor, "batch q_head chunk n_cand"],
) -> Float[Tensor, "batch q_head chunk n_cand"]:
    """Max over the real queries; empty candidate ranges score ``-inf``."""
    best = scores.masked_fill(~real_queries[None, None, :, None, :], float("-inf")).amax(-1)
    return best.masked_fill(cand_end <= cand_start, float("-inf"))


# ----- pooled: mean key of a range from a prefix sum -------------------------------------------
def key_block_prefix_sums(
    key: Float[Tensor, "batch kv_head seq d_head"], key_block: int
) -> tuple[Float[Tensor, "batch kv_head n_key_blocks_plus_1 d_head"], Int[Tensor, "n_key_blocks_plus_1"]]:
    """Prefix sums over per-block key sums (float64) and over real key counts.

    The keys of blocks ``[s, e)`` sum to ``sums[e] - sums[s]`` and number ``counts[e] - counts[s]``.
    """
    block_sums = split_into_blocks(key, key_block).double().sum(3)
    sums = torch.nn.functional.pad(block_sums.cumsum(2), (0, 0, 1, 0))
    counts = torch.nn.functional.pad(tokens_per_block(key.shape[2], key_block, key.device).cumsum(0), (1, 0))
    return sums, counts


def range_mean_keys(
    sums: Float[Tensor, "batch kv_head n_key_blocks_plus_1 d_head"],
    counts: Int[Tensor, "n_key_blocks_plus_1"],
    start: Int[Tensor, "batch q_head *rest"],
    end: Int[Tensor, "batch q_head *rest"],
) -> Float[Tensor, "batch q_head *rest d_head"]:
    """Mean key of the key blocks ``[start, end)``, per query head (0 for empty ranges)."""
    total = gather_per_head(sums, end) - gather_per_head(sums, start)
    n_keys = (counts[end] - counts[start]).clamp(min=1)
    return (total / n_keys[..., None]).float()


def pooled_range_scorer(
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    query_stride: int = 1,
    mean_query: bool = False,
) -> RangeScorer:
    """Score of a range: ``max q . mean_key(range)`` over the scoring queries (see ``pooled_estimate``)."""
    sums, counts = key_block_prefix_sums(key, key_block)

    def score(query_blocks, block_ids, cand_start, cand_end):
        mean_keys = range_mean_keys(sums, counts, cand_start, cand_end)
        queries, real = scoring_queries(query_blocks, block_ids, seq_len, query_block, query_stride, mean_query)
        scores = torch.einsum("bhjqd,bhjcd->bhjcq", queries, mean_keys)
        return best_over_queries(scores, real, cand_start, cand_end)

    return score


def scoring_queries(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    block_ids: Int[Tensor, "chunk"],
    seq_len: int,
    query_block: int,
    query_stride: int,
    mean_query: bool,
) -> tuple[Float[Tensor, "batch q_head chunk n_query d_head"], Bool[Tensor, "chunk n_query"]]:
    """The queries a block is scored with: every ``query_stride``-th one counted from the block's
    last slot (``query_stride=0``: none), plus the block's mean query if ``mean_query``."""
    real = real_query_mask(block_ids, query_block, seq_len)
    parts, masks = [], []
    if query_stride > 0:
        slots = torch.arange(query_block - 1, -1, -query_stride, device=block_ids.device).flip(0)
        parts.append(query_blocks[:, :, :, slots])
        masks.append(real[:, slots])
    if mean_query:
        n_real = real.sum(-1).clamp(min=1)
        parts.append((query_blocks.sum(3) / n_real[:, None]).unsqueeze(3))
        masks.append(torch.ones_like(real[:, :1]))
    return torch.cat(parts, dim=3), torch.cat(masks, dim=1)


def pooled_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    query_stride: int = 1,
    mean_query: bool = False,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Hierarchical refinement scoring a range by ``max_i q_i . mean_key(range)``.

    Scoring queries: every ``query_stride``-th query of the block (1: all of them; 0: none) and,
    if ``mean_query``, the block's mean query. With all queries the mean query never changes the
    max (``qbar . k`` is the mean of the ``q_i . k``), so it only matters with a stride.
    Cost O(T/query_block * log(T) * top_k * (query_block / query_stride) * D); mean keys of a range
    in O(1) from a prefix sum of ``[n_key_blocks + 1, D]`` per key head.
    """
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    if query_stride == 0 and not mean_query:
        raise ValueError("query_stride=0 needs mean_query=True (no scoring query otherwise).")
    n_queries = (num_blocks(query_block, query_stride) if query_stride else 0) + int(mean_query)
    scorer = pooled_range_scorer(key, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                                 query_stride=query_stride, mean_query=mean_query)
    return hierarchical_search(
        query, key, scorer, query_block=query_block, key_block=key_block, top_k=top_k,
        sink_blocks=sink_blocks, local_blocks=local_blocks,
        bytes_per_candidate=4 * (n_queries + 3 * query.shape[-1]),
    )


# ----- bounds: Quest's upper bound from a sparse table of key min / max ------------------------
def build_sparse_table(
    key: Float[Tensor, "batch kv_head seq d_head"], key_block: int
) -> tuple[Float[Tensor, "batch kv_head levels n_key_blocks d_head"], Float[Tensor, "batch kv_head levels n_key_blocks d_head"]]:
    """Range min / max tables: level ``l`` at block ``b`` holds the elementwise min / max of the
    keys of blocks ``[b, b + 2^l)`` (valid for ``b <= n_key_blocks - 2^l``; the rest is filler).

    Memory O(n_key_blocks * log2(n_key_blocks) * D) per key head.
    """
    blocks = split_into_blocks(key, key_block)
    seq_len, n_key_blocks = key.shape[2], blocks.shape[2]
    real = (torch.arange(n_key_blocks * key_block, device=key.device) < seq_len).view(n_key_blocks, key_block, 1)
    level_min = blocks.masked_fill(~real, float("inf")).amin(3)
    level_max = blocks.masked_fill(~real, float("-inf")).amax(3)
    mins, maxs = [level_min], [level_max]
    width = 1
    while 2 * width <= n_key_blocks:
        partner = (torch.arange(n_key_blocks, device=key.device) + width).clamp(max=n_key_blocks - 1)
        level_min = torch.minimum(level_min, level_min[:, :, partner])
        level_max = torch.maximum(level_max, level_max[:, :, partner])
        mins.append(level_min)
        maxs.append(level_max)
        width *= 2
    return torch.stack(mins, dim=2), torch.stack(maxs, dim=2)


def range_min_max(
    table_min: Float[Tensor, "batch kv_head levels n_key_blocks d_head"],
    table_max: Float[Tensor, "batch kv_head levels n_key_blocks d_head"],
    start: Int[Tensor, "batch q_head *rest"],
    end: Int[Tensor, "batch q_head *rest"],
) -> tuple[Float[Tensor, "batch q_head *rest d_head"], Float[Tensor, "batch q_head *rest d_head"]]:
    """Elementwise min / max of the keys of blocks ``[start, end)`` in O(1): two overlapping
    power-of-two windows. Empty ranges give filler (callers mask them)."""
    length = (end - start).clamp(min=1)
    level = torch.floor(torch.log2(length.double())).long()
    # log2 of exact powers of two is exact in float64; guard against rounding anyway.
    level = level - ((1 << level) > length).long() + ((1 << (level + 1)) <= length).long()
    n_key_blocks = table_min.shape[3]
    left = start.clamp(0, n_key_blocks - 1)
    right = (end - (1 << level)).clamp(0, n_key_blocks - 1)
    flat = lambda table: table.flatten(2, 3)  # noqa: E731  [b, h, levels * n_key_blocks, d]
    low = torch.minimum(gather_per_head(flat(table_min), level * n_key_blocks + left),
                        gather_per_head(flat(table_min), level * n_key_blocks + right))
    high = torch.maximum(gather_per_head(flat(table_max), level * n_key_blocks + left),
                         gather_per_head(flat(table_max), level * n_key_blocks + right))
    return low, high


def upper_bound_scores(
    queries: Float[Tensor, "batch q_head chunk n_query d_head"],
    low: Float[Tensor, "batch q_head chunk n_cand d_head"],
    high: Float[Tensor, "batch q_head chunk n_cand d_head"],
) -> Float[Tensor, "batch q_head chunk n_cand n_query"]:
    """Quest's bound ``sum_d max(q_d * high_d, q_d * low_d) = q . centre + |q| . radius``."""
    centre, radius = (high + low) / 2, (high - low) / 2
    return torch.einsum("bhjqd,bhjcd->bhjcq", queries, centre) + torch.einsum("bhjqd,bhjcd->bhjcq", queries.abs(), radius)


def bounds_range_scorer(
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    query_stride: int = 1,
) -> RangeScorer:
    """Score of a range: the max over the block's queries of Quest's upper bound on ``q . k``."""
    table_min, table_max = build_sparse_table(key, key_block)

    def score(query_blocks, block_ids, cand_start, cand_end):
        low, high = range_min_max(table_min, table_max, cand_start, cand_end)
        queries, real = scoring_queries(query_blocks, block_ids, seq_len, query_block, query_stride, False)
        return best_over_queries(upper_bound_scores(queries, low, high), real, cand_start, cand_end)

    return score


def bounds_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Hierarchical refinement scoring a range by the Quest upper bound (branch and bound).

    A range scores ``max_i sum_d max(q_id * kmax_d, q_id * kmin_d)`` with ``kmin``/``kmax`` the
    elementwise min/max of its keys, read in O(1) from a sparse table built once per call
    (``O(n_key_blocks log n_key_blocks D)`` memory per key head). The score bounds every
    ``q_i . k`` in the range from above. Cost: 2x ``pooled_estimate``'s matmuls.
    """
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    if query_stride < 1:
        raise ValueError("query_stride must be >= 1.")
    n_queries = num_blocks(query_block, query_stride)
    scorer = bounds_range_scorer(key, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                                 query_stride=query_stride)
    return hierarchical_search(
        query, key, scorer, query_block=query_block, key_block=key_block, top_k=top_k,
        sink_blocks=sink_blocks, local_blocks=local_blocks,
        bytes_per_candidate=4 * (3 * n_queries + 8 * query.shape[-1]),
    )


# ---------------------------------------------------------------------------------------------
# One-shot baselines: score every causal block pair, then top-k
# ---------------------------------------------------------------------------------------------
def top_k_of_block_scores(
    block_scores: Float[Tensor, "batch q_head n_query_blocks n_key_blocks"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Sink and local blocks plus the ``n_search`` best-scored blocks of each row's searched range."""
    batch, n_q_heads, n_query_blocks, n_key_blocks = block_scores.shape
    device = block_scores.device
    n_visible = visible_key_blocks(seq_len, query_block, key_block, device=device)
    searched_row = n_visible > top_k
    keep_all = keep_all_rows(n_visible, top_k).expand(batch, n_q_heads, -1, -1)
    if not bool(searched_row.any()):
        return keep_all
    n_search = top_k - sink_blocks - local_blocks
    column = torch.arange(n_key_blocks, device=device)
    in_range = (column >= sink_blocks) & (column < (n_visible - local_blocks)[:, None])
    chosen = block_scores.masked_fill(~in_range, float("-inf")).topk(n_search, dim=-1).indices
    fixed = fixed_blocks(n_visible, sink_blocks, local_blocks).expand(batch, n_q_heads, -1, -1)
    searched = sort_block_row(torch.cat([fixed, chosen], dim=-1))
    return torch.where(searched_row[:, None], searched, keep_all)


def mean_blocks(tensor: Float[Tensor, "batch head seq d"], block: int) -> Float[Tensor, "batch head n_blocks d"]:
    """Mean of the real tokens of every block."""
    counts = tokens_per_block(tensor.shape[2], block, tensor.device)
    return split_into_blocks(tensor, block).sum(3) / counts[:, None]


def pooled_block_scores(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
) -> Float[Tensor, "batch q_head n_query_blocks n_key_blocks"]:
    """``mean_query(query block) . mean_key(key block)`` for every block pair (non-causal)."""
    n_q_heads, n_kv_heads = query.shape[1], key.shape[1]
    mean_q = mean_blocks(query, query_block).unflatten(1, (n_kv_heads, n_q_heads // n_kv_heads))
    mean_k = mean_blocks(key, key_block)
    return torch.einsum("bhgjd,bhkd->bhgjk", mean_q, mean_k).flatten(1, 2)


def oneshot_pooled_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """MInference / FlexPrefill-style one-shot selection: top-k of mean-pooled block scores.

    Scores every (query block, key block) pair by ``mean_query . mean_key``: O((T / block)^2)
    time and memory per head (not O(T log T)), O(T * D) for the pooling.
    """
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    scores = pooled_block_scores(query, key, query_block=query_block, key_block=key_block)
    return top_k_of_block_scores(scores, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                                 top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)


def antidiagonal_stride(stride: int, query_block: int, key_block: int) -> int:
    """The stride actually used: the largest divisor of both block sizes that is <= ``stride``."""
    return max(s for s in range(1, stride + 1) if query_block % s == 0 and key_block % s == 0)


def antidiagonal_block_scores(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    stride: int = 8,
    normalize: Literal["sum", "softmax"] = "sum",
    scale: float | None = None,
) -> Float[Tensor, "batch q_head n_query_blocks n_key_blocks"]:
    """Antidiagonal block scores, after XAttention's description.

    Token pairs ``(i, j)`` with ``j <= i`` and ``(i + j) % S == S - 1`` (one antidiagonal in every
    ``S x S`` tile) are summed per block pair: ``"sum"`` sums ``q_i . k_j``; ``"softmax"`` first
    turns each strided row (query tile ``m`` against every causal key tile ``m'``, logit
    ``scale * tile_sum / S``) into a softmax, then sums the probabilities per block pair.
    Reshaping ``S`` queries (reversed) and ``S`` keys of each tile into one ``S * D`` vector makes
    a tile's antidiagonal a single dot product, so the cost is O(T^2 D / S), memory O((T / S)^2).
    """
    batch, n_q_heads, seq_len, d_head = query.shape
    n_kv_heads = key.shape[1]
    s = antidiagonal_stride(stride, query_block, key_block)
    scale = d_head**-0.5 if scale is None else scale
    grid = query_block * key_block // math.gcd(query_block, key_block)
    padded = num_blocks(seq_len, grid) * grid
    n_tiles = padded // s
    q = pad_to_blocks(query.float(), padded).unflatten(2, (n_tiles, s))  # [b, hq, tiles, s, d]
    k = pad_to_blocks(key.float(), padded).unflatten(2, (n_tiles, s))  # [b, hkv, tiles, s, d]
    q_strided = q.flip(3).flatten(3, 4).unflatten(1, (n_kv_heads, n_q_heads // n_kv_heads))
    k_strided = k.flatten(3, 4)
    tiles: Float[Tensor, "batch q_head n_tiles n_tiles"] = torch.einsum(
        "bhgmx,bhnx->bhgmn", q_strided, k_strided).flatten(1, 2)
    # Diagonal tiles: only the causal half of the antidiagonal (key slot r <= query slot s-1-r).
    causal_slot = torch.arange(s, device=query.device) <= (s - 1) // 2
    k_per_q = k.repeat_interleave(n_q_heads // n_kv_heads, dim=1)
    diagonal = ((q.flip(3) * k_per_q).sum(-1) * causal_slot).sum(-1)  # [b, hq, tiles]
    tile_ids = torch.arange(n_tiles, device=query.device)
    tiles = tiles.masked_fill(tile_ids[None, :] > tile_ids[:, None], 0.0)
    tiles = torch.diagonal_scatter(tiles, diagonal, dim1=-2, dim2=-1)
    if normalize == "softmax":
        real_key_tile = tile_ids * s < seq_len
        allowed = (tile_ids[None, :] <= tile_ids[:, None]) & real_key_tile[None, :]
        logits = (tiles * (scale / s)).masked_fill(~allowed, float("-inf"))
        tiles = torch.softmax(logits, dim=-1) * (tile_ids * s < seq_len)[:, None]
    elif normalize != "sum":
        raise ValueError(f"normalize must be 'sum' or 'softmax', got {normalize!r}.")
    n_query_blocks, n_key_blocks = num_blocks(seq_len, query_block), num_blocks(seq_len, key_block)
    block_sums = tiles.unflatten(2, (-1, query_block // s)).sum(3).unflatten(3, (-1, key_block // s)).sum(4)
    return block_sums[:, :, :n_query_blocks, :n_key_blocks]


def antidiagonal_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    stride: int = 8,
    normalize: Literal["sum", "softmax"] = "sum",
    scale: float | None = None,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """XAttention-style one-shot selection: top-k of antidiagonal block scores (stride ``stride``).

    See ``antidiagonal_block_scores``. O(T^2 D / stride) time and O((T / stride)^2) memory per
    head: a baseline, not O(T log T). ``scale`` (default ``D**-0.5``) only matters for
    ``normalize="softmax"``.
    """
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    scores = antidiagonal_block_scores(query, key, query_block=query_block, key_block=key_block,
                                       stride=stride, normalize=normalize, scale=scale)
    return top_k_of_block_scores(scores, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                                 top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)


# ---------------------------------------------------------------------------------------------
# Candidate masses: estimated (pooled) or exact, per query block
# ---------------------------------------------------------------------------------------------
MassEstimate = Literal["pooled", "exact"]


def exact_block_log_mass(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    blocks: Int[Tensor, "batch q_head chunk width"],
    block_ids: Int[Tensor, "chunk"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    query_slots: Int[Tensor, "n_query"] | None = None,
) -> Float[Tensor, "batch q_head chunk n_query width"]:
    """Exact causal log-sum-exp of ``scale * q . k`` over each listed key block, per query
    (``-inf`` for ``-1`` slots and for queries that see none of the block's keys).
    ``query_blocks`` holds the queries at ``query_slots`` of each block (default: all)."""
    seq_len = key.shape[2]
    valid = blocks >= 0
    if query_slots is None:
        query_slots = torch.arange(query_block, device=key.device)
    key_positions = blocks.clamp(min=0)[..., None] * key_block + torch.arange(key_block, device=key.device)
    key_tokens = gather_per_head(pad_to_blocks(key.float(), key_block), key_positions)  # [b, h, chunk, w, bk, d]
    logits = torch.einsum("bhjqd,bhjwkd->bhjqwk", query_blocks, key_tokens) * scale
    query_positions = block_ids[:, None] * query_block + query_slots
    visible = (key_positions[:, :, :, None] <= query_positions[None, None, :, :, None, None]) & (
        key_positions[:, :, :, None] < seq_len) & valid[:, :, :, None, :, None]
    return torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)


def pooled_log_mass(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    sums: Float[Tensor, "batch kv_head n_key_blocks_plus_1 d_head"],
    counts: Int[Tensor, "n_key_blocks_plus_1"],
    blocks: Int[Tensor, "batch q_head chunk width"],
    *,
    scale: float,
) -> Float[Tensor, "batch q_head chunk query_block width"]:
    """Estimated log-sum-exp of each block per query: ``scale * q . mean_key + log n_keys``
    (first order; a lower bound by Jensen). ``-inf`` for ``-1`` slots."""
    block = blocks.clamp(min=0)
    mean_keys = range_mean_keys(sums, counts, block, block + 1)
    estimate = torch.einsum("bhjqd,bhjcd->bhjqc", query_blocks, mean_keys) * scale
    estimate = estimate + torch.log((counts[block + 1] - counts[block]).float())[:, :, :, None, :]
    return estimate.masked_fill(~(blocks >= 0)[:, :, :, None, :], float("-inf"))


def estimated_block_mass(
    log_mass: Float[Tensor, "batch q_head chunk query_block width"],
    real_queries: Bool[Tensor, "chunk query_block"],
) -> Float[Tensor, "batch q_head chunk width"]:
    """Per-query softmax over the candidates, averaged over the block's real queries."""
    probs = torch.softmax(log_mass, dim=-1).nan_to_num(0.0) * real_queries[None, None, :, :, None]
    return probs.sum(3) / real_queries.sum(-1).clamp(min=1)[None, None, :, None]


def fixed_slot_mask(
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    n_visible: Int[Tensor, "n_query_blocks"],
    sink_blocks: int,
    local_blocks: int,
) -> Bool[Tensor, "batch q_head n_query_blocks width"]:
    """Which candidate slots hold a sink or local block (always kept)."""
    fixed = fixed_blocks(n_visible, sink_blocks, local_blocks)
    return (candidates[..., None] == fixed[None, None, :, None, :]).any(-1) & (candidates >= 0)


def candidate_block_mass(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    sink_blocks: int,
    local_blocks: int,
    estimate: MassEstimate = "exact",
    scale: float | None = None,
    query_stride: int = 1,
) -> Float[Tensor, "batch q_head n_query_blocks width"]:
    """Share of each query block's attention that each candidate receives, normalised over the
    candidates: per query a softmax over the candidates' block log-masses, averaged over the
    block's queries (every ``query_stride``-th one, counted from the block's last query).

    ``estimate="exact"``: every candidate's exact causal log-sum-exp (the cost of attention over
    the candidates, O(width * query_block * key_block * D) per query block). ``"pooled"``: the
    mean-key estimate for searched blocks and the exact value for sink and local blocks.
    """
    batch, n_q_heads, seq_len, d_head = query.shape
    scale = d_head**-0.5 if scale is None else scale
    width = candidates.shape[-1]
    query_blocks = split_into_blocks(query, query_block)
    n_visible = visible_key_blocks(seq_len, query_block, key_block, device=query.device)
    always_keep = fixed_slot_mask(candidates, n_visible, sink_blocks, local_blocks)
    slots = torch.arange(query_block - 1, -1, -query_stride, device=query.device).flip(0)
    if estimate not in ("pooled", "exact"):
        raise ValueError(f"estimate must be 'pooled' or 'exact', got {estimate!r}.")
    sums, counts = key_block_prefix_sums(key, key_block) if estimate == "pooled" else (None, None)
    exact_width = width if estimate == "exact" else sink_blocks + local_blocks
    chunk = query_blocks_per_chunk(batch * n_q_heads * len(slots) * (width * 16 + exact_width * key_block * 12)
                                   + batch * n_q_heads * width * key_block * d_head * 4)
    masses = []
    for first in range(0, candidates.shape[2], chunk):
        block_ids = torch.arange(first, min(first + chunk, candidates.shape[2]), device=query.device)
        rows, keep = candidates[:, :, block_ids], always_keep[:, :, block_ids]
        queries = query_blocks[:, :, block_ids][:, :, :, slots]
        exact_kwargs = dict(query_block=query_block, key_block=key_block, scale=scale, query_slots=slots)
        if estimate == "exact":
            log_mass = exact_block_log_mass(queries, key, rows, block_ids, **exact_kwargs)
        else:
            log_mass = pooled_log_mass(queries, sums, counts, rows, scale=scale)
            fixed_only = torch.where(keep, rows, torch.full_like(rows, UNUSED_SLOT))
            exact = exact_block_log_mass(queries, key, fixed_only, block_ids, **exact_kwargs)
            log_mass = torch.where(keep[:, :, :, None, :], exact, log_mass)
        masses.append(estimated_block_mass(log_mass, real_query_mask(block_ids, query_block, seq_len)[:, slots]))
    return torch.cat(masses, dim=2)


def select_heaviest(
    candidates: Int[Tensor, "batch q_head rows width"],
    block_mass: Float[Tensor, "batch q_head rows width"],
    always_keep: Bool[Tensor, "batch q_head rows width"],
    n_keep: Int[Tensor, "batch q_head rows 1"] | int,
) -> Int[Tensor, "batch q_head rows width"]:
    """Keep the ``always_keep`` slots and then the heaviest, ``n_keep`` valid slots in all;
    ascending, ``-1`` elsewhere (same width)."""
    valid = candidates >= 0
    rank_key = block_mass.masked_fill(~valid, -1.0) + always_keep.float() * 2.0
    order = rank_key.argsort(dim=-1, descending=True, stable=True)
    slot = torch.arange(candidates.shape[-1], device=candidates.device)
    n_keep = torch.minimum(torch.as_tensor(n_keep, device=candidates.device), valid.sum(-1, keepdim=True))
    kept = torch.where(slot < n_keep, candidates.gather(-1, order), torch.full_like(candidates, UNUSED_SLOT))
    return sort_block_row(kept)


# ---------------------------------------------------------------------------------------------
# Rescored search: a wide hierarchical search, then exact masses of its candidates
# ---------------------------------------------------------------------------------------------
def rescored_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    beam: int = 4,
    search: EstimatorName = "bounds",
    scale: float | None = None,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Hierarchical search with ``beam`` times the branches, then exact rescoring.

    1. ``search`` (``"bounds"`` or ``"pooled"``) keeps ``beam * n_search`` candidate blocks
       (``n_search = top_k - sink - local``).
    2. Each candidate's exact block log-sum-exp per query (keys read in full); per query a
       softmax over candidates, sink and local blocks, averaged over the block's queries (every
       ``query_stride``-th query, counted from the block's last one).
    3. Keep sink, local and the ``n_search`` heaviest candidates.
    Cost: the search at ``top_k' = sink + local + beam * n_search`` plus
    O(beam * n_search * (query_block / query_stride) * key_block * D) per query block (attention
    logits over the candidates); memory O(T) plus a chunk's scratch.
    """
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    if beam < 1:
        raise ValueError("beam must be >= 1.")
    n_search = top_k - sink_blocks - local_blocks
    wide = sink_blocks + local_blocks + beam * n_search
    candidates = search_candidates(query, key, search, query_block=query_block, key_block=key_block,
                                   top_k=wide, sink_blocks=sink_blocks, local_blocks=local_blocks)
    n_visible = visible_key_blocks(query.shape[2], query_block, key_block, device=query.device)
    mass = candidate_block_mass(query, key, candidates, query_block=query_block, key_block=key_block,
                                sink_blocks=sink_blocks, local_blocks=local_blocks, estimate="exact", scale=scale,
                                query_stride=query_stride)
    always_keep = fixed_slot_mask(candidates, n_visible, sink_blocks, local_blocks)
    return select_heaviest(candidates, mass, always_keep, top_k)[..., :top_k]


def search_candidates(query, key, search: EstimatorName, **kwargs) -> Tensor:
    """Candidates of a hierarchical search by name."""
    estimators = {"pooled": pooled_estimate, "bounds": bounds_estimate}
    if search not in estimators:
        raise ValueError(f"search must be one of {tuple(estimators)}, got {search!r}.")
    return estimators[search](query, key, **kwargs)


# ---------------------------------------------------------------------------------------------
# Adaptive budget: smallest set of candidates reaching an estimated mass p
# ---------------------------------------------------------------------------------------------
def select_top_p(
    candidates: Int[Tensor, "batch q_head rows width"],
    block_mass: Float[Tensor, "batch q_head rows width"],
    always_keep: Bool[Tensor, "batch q_head rows width"],
    *,
    p: float,
    min_blocks: int,
) -> Int[Tensor, "batch q_head rows width"]:
    """Smallest set of candidates, best first (``always_keep`` ones first of all), whose mass
    reaches ``p``; at least ``min_blocks`` (or all valid ones), ascending, ``-1`` elsewhere."""
    valid = candidates >= 0
    rank_key = block_mass.masked_fill(~valid, -1.0) + always_keep.float() * 2.0
    sorted_mass = block_mass.masked_fill(~valid, 0.0).gather(-1, rank_key.argsort(dim=-1, descending=True, stable=True))
    mass_before = sorted_mass.cumsum(-1) - sorted_mass
    n_keep = (mass_before < p).sum(-1, keepdim=True)
    n_keep = torch.maximum(n_keep, always_keep.sum(-1, keepdim=True)).clamp(min=min_blocks)
    return select_heaviest(candidates, block_mass, always_keep, n_keep)


def adaptive_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    p: float = 0.9,
    min_blocks: int = 4,
    max_blocks: int = 64,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    search: EstimatorName = "bounds",
    estimate: MassEstimate = "exact",
    scale: float | None = None,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks max_blocks"]:
    """Adaptive budget: per (head, query block) the smallest set of candidates reaching mass ``p``.

    1. Candidates: ``search`` (``"bounds"`` or ``"pooled"``) with ``top_k = max_blocks`` (rows
       seeing at most ``max_blocks`` key blocks: all of them).
    2. Their mass (``candidate_block_mass``): per query a softmax over the candidates' block
       log-masses, averaged over the block's queries; ``estimate="exact"`` uses exact block
       log-sum-exps (the rescoring of ``rescored_estimate``), ``"pooled"`` the mean-key estimate
       ``scale * q . mean_key + log n_keys`` (exact for sink / local blocks); every
       ``query_stride``-th query of the block is used. Either way the shares are normalised over
       the candidates: mass the search discarded is not counted, so the kept dense mass is
       below ``p`` when the candidates miss mass (``p`` is a knob, not a guarantee).
    3. Keep sink and local blocks, then the heaviest candidates until the kept mass reaches
       ``p``; at least ``max(min_blocks, sink + local)``, at most ``max_blocks``.
    Output width ``max_blocks``, ``-1`` in unused slots. Cost: the search at ``top_k =
    max_blocks`` plus the mass estimate (exact: attention logits over the ``max_blocks``
    candidates; pooled: O(max_blocks * query_block * D) per query block).
    """
    candidates, mass, always_keep = adaptive_candidates(
        query, key, query_block=query_block, key_block=key_block, max_blocks=max_blocks,
        sink_blocks=sink_blocks, local_blocks=local_blocks, search=search, estimate=estimate, scale=scale,
        query_stride=query_stride,
    )
    return select_top_p(candidates, mass, always_keep, p=p, min_blocks=min_blocks)


def adaptive_candidates(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    max_blocks: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    search: EstimatorName = "bounds",
    estimate: MassEstimate = "exact",
    scale: float | None = None,
    query_stride: int = 1,
) -> tuple[
    Int[Tensor, "batch q_head n_query_blocks max_blocks"],
    Float[Tensor, "batch q_head n_query_blocks max_blocks"],
    Bool[Tensor, "batch q_head n_query_blocks max_blocks"],
]:
    """Steps 1-2 of ``adaptive_estimate``: ``(candidates, mass, always-kept mask)``, so that
    several ``p`` can be tried with ``select_top_p`` on one search."""
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, max_blocks, sink_blocks, local_blocks)
    candidates = search_candidates(query, key, search, query_block=query_block, key_block=key_block,
                                   top_k=max_blocks, sink_blocks=sink_blocks, local_blocks=local_blocks)
    mass = candidate_block_mass(query, key, candidates, query_block=query_block, key_block=key_block,
                                sink_blocks=sink_blocks, local_blocks=local_blocks, estimate=estimate, scale=scale,
                                query_stride=query_stride)
    n_visible = visible_key_blocks(query.shape[2], query_block, key_block, device=query.device)
    return candidates, mass, fixed_slot_mask(candidates, n_visible, sink_blocks, local_blocks)
