"""The hierarchical block search: one loop with pluggable branch scores (torch).

``hierarchical_search``: ``n_search = top_k - sink - local`` branches cover the searched range,
every round splits each branch in two and keeps the best ``n_search`` halves;
``R = BlockGeometry.search_rounds(T)`` (about ``log2(n_kb / n_search)``) rounds; with
``expand_levels = E > 0`` the expanded search (``stream``'s module doc). The estimators
differ only in the score of a candidate half (a contiguous key-block range):

- Stream (``stream.stream_estimate``): the max ``q . k`` over evenly strided keys of the
  range's centre block (``stream.score_branches_by_center_block``);

- :func:`pooled_estimate`: ``max_i q_i . mean_key(range)`` over the query block's queries
  (optionally strided, optionally with the block's mean query added). Mean keys of any range
  come in O(1) from a prefix sum over per-block key sums (``[n_kb + 1, D]`` per key head).
  Time O(n_qb * R * 2 n_search * query_block * D), 8x fewer FLOPs than Stream's default of 8
  representative keys; memory O(n_kb * D) per key head.
- :func:`bounds_estimate` (Quest-style branch and bound):
  ``max_i sum_d max(q_id * kmax_d, q_id * kmin_d)`` where ``kmin`` / ``kmax`` are the
  elementwise min / max of every key in the range, read in O(1) from a sparse table
  (``O(n_kb log n_kb D)`` memory per key head). Written as ``q . centre + |q| . radius`` it
  costs two matmuls: 2x the pooled FLOPs.

Output contract (shared by every estimator, see ``estimate.py``): int64 ``[batch, q_head,
n_query_blocks, top_k]`` kept key blocks, ascending, ``-1`` in unused slots at the end; a query
block that sees ``<= top_k`` causal key blocks keeps them all; sink blocks (sequence start) and
local blocks (ending at the diagonal) are always kept and counted inside ``top_k``. Inputs are
rotated queries ``[B, Hq, T, D]`` and keys ``[B, Hkv, T, D]`` (GQA: query head ``h`` reads key
head ``h // group``); ``n_kb = T / key_block``, ``n_qb = T / query_block``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import (
    UNUSED_SLOT,
    BlockGeometry,
    first_searched_block,
    fixed_blocks,
    gather_per_head,
    keep_all_rows,
    num_blocks,
    query_blocks_per_chunk,
    real_query_mask,
    sort_block_row,
    split_into_blocks,
    tokens_per_block,
    visible_key_blocks,
)
from sparse_lens.kernels.checks import check_attention_inputs

# A range scorer: (query blocks of a chunk, their ids, candidate [start, end) key-block ranges)
# -> a score per candidate, -inf for empty ranges. Higher is better.
RangeScorer = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
SearchName = Literal["stream", "bounds", "pooled"]


def hierarchical_search(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    score_ranges: RangeScorer,
    geometry: BlockGeometry,
    *,
    bytes_per_candidate: int,
    expand_levels: int = 0,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Stream's binary-search refinement, scoring candidate key-block ranges with ``score_ranges``.

    ``score_ranges(query_blocks, block_ids, cand_start, cand_end)`` gets the chunk's query blocks
    ``[B, Hq, chunk, query_block, D]``, their ids ``[chunk]`` and candidate ranges
    ``[B, Hq, chunk, n_cand]`` and returns ``[B, Hq, chunk, n_cand]`` scores (``-inf`` for
    empty ranges). With ``score_branches_by_center_block`` it is ``stream_estimate``.
    ``expand_levels = E > 0``: ``n_search / 2**E`` branches (``expanded_branches``), each row
    stopped once its branches span at most ``2**E`` blocks (``expanded_rounds``; a data-dependent
    round count, so not under ``torch.compile(fullgraph=True)``), every block of the branches kept.
    """
    query_block, key_block, top_k = geometry.query_block, geometry.key_block, geometry.top_k
    sink_blocks, local_blocks = geometry.sink_blocks, geometry.local_blocks
    n_search = expanded_branches(geometry.n_search, expand_levels)  # branches: n_search / 2**E
    batch, n_q_heads, seq_len, _ = query.shape
    n_query_blocks = num_blocks(seq_len, query_block)
    first_searched = first_searched_block(seq_len, query_block, key_block, top_k)
    n_rounds = geometry.search_rounds(seq_len)

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
        rounds = n_rounds
        if expand_levels > 0:  # each row stops once its branches span <= 2**E blocks
            row_rounds = expanded_rounds(n_visible[block_ids], sink_blocks, local_blocks, n_search, expand_levels)
            rounds = int(row_rounds.max())
        for level in range(rounds):
            mid = start + (end - start + 1) // 2
            cand_start = torch.cat([start, mid], dim=-1)
            cand_end = torch.cat([mid, end], dim=-1)
            score = score_ranges(query_blocks[:, :, block_ids], block_ids, cand_start, cand_end)
            best = score.topk(n_search, dim=-1).indices
            if expand_levels == 0:
                start, end = cand_start.gather(-1, best), cand_end.gather(-1, best)
            else:
                searching = (level < row_rounds)[:, None]
                start = torch.where(searching, cand_start.gather(-1, best), start)
                end = torch.where(searching, cand_end.gather(-1, best), end)
        if expand_levels == 0:
            searched = start
        else:  # every block of every branch, -1 past a branch's end
            searched = start[..., None] + torch.arange(1 << expand_levels, device=query.device)
            searched = torch.where(searched < end[..., None], searched, torch.full_like(searched, UNUSED_SLOT))
            searched = searched.flatten(-2)
        rows.append(sort_block_row(torch.cat([fixed, searched], dim=-1)))
    return torch.cat(rows, dim=2)


def expanded_branches(n_slots: int, expand_levels: int) -> int:
    """Branches of the expanded search: ``n_slots / 2**expand_levels`` (the searched slots)."""
    if not isinstance(expand_levels, int) or expand_levels < 0 or n_slots % (1 << expand_levels):
        raise InvalidConfigError(
            f"expand_levels must be an int >= 0 with 2**expand_levels dividing top_k - sink - local = {n_slots}, "
            f"got {expand_levels!r}.")
    return n_slots >> expand_levels


def expanded_rounds(
    n_visible: Int[Tensor, "rows"], sink_blocks: int, local_blocks: int, n_branches: int, expand_levels: int,
) -> Int[Tensor, "rows"]:
    """Rounds after which every branch of a row spans at most ``2**expand_levels`` blocks:
    ``ceil(log2(ceil(range / n_branches))) - expand_levels``, at least 0 (integer arithmetic)."""
    widest_branch = -(-(n_visible - sink_blocks - local_blocks) // n_branches)
    levels = int(widest_branch.max()).bit_length() if widest_branch.numel() else 0
    return sum((widest_branch > (1 << (level + expand_levels))).long() for level in range(levels))


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
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    if query_stride == 0 and not mean_query:
        raise ValueError("query_stride=0 needs mean_query=True (no scoring query otherwise).")
    return pooled_estimate_unchecked(query, key, geometry, query_stride=query_stride, mean_query=mean_query)


def pooled_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    query_stride: int = 1,
    mean_query: bool = False,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``pooled_estimate`` on inputs the caller has validated (``estimate_blocks``)."""
    n_queries = (num_blocks(geometry.query_block, query_stride) if query_stride else 0) + int(mean_query)
    scorer = pooled_range_scorer(key, seq_len=query.shape[2], query_block=geometry.query_block,
                                 key_block=geometry.key_block, query_stride=query_stride, mean_query=mean_query)
    return hierarchical_search(query, key, scorer, geometry, bytes_per_candidate=4 * (n_queries + 3 * query.shape[-1]))


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
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    if query_stride < 1:
        raise ValueError("query_stride must be >= 1.")
    return bounds_estimate_unchecked(query, key, geometry, query_stride=query_stride)


def bounds_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``bounds_estimate`` on inputs the caller has validated (``estimate_blocks``)."""
    n_queries = num_blocks(geometry.query_block, query_stride)
    scorer = bounds_range_scorer(key, seq_len=query.shape[2], query_block=geometry.query_block,
                                 key_block=geometry.key_block, query_stride=query_stride)
    return hierarchical_search(query, key, scorer, geometry, bytes_per_candidate=4 * (3 * n_queries + 8 * query.shape[-1]))


SEARCHES = ("stream", "bounds", "pooled")
