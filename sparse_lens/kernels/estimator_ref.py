"""Stream estimator, torch reference: hierarchical top-k key-block selection per query block.

For every (batch, query head, query block) the estimator keeps ``top_k`` causal key blocks:
``sink_blocks`` at the start, ``local_blocks`` ending at the diagonal, and ``top_k - sink -
local`` found by a binary-search-style refinement over the key blocks in between:

1. split the searched range into ``n_search`` equal branches;
2. split every branch in two, score each half, keep the best ``n_search`` halves;
3. repeat until every branch is one key block (about ``log2(n_key_blocks / n_search)`` rounds).

A half is scored by a representative (the paper's choice, after HiP): its centre key block,
scored as the max over the query block's queries and ``representative_keys`` evenly strided
keys of that block of ``q . k`` (``representative_keys = key_block`` reads the whole block).
Each round scores ``2 * n_search`` candidates per query block, so the cost is
O(T * top_k * representative_keys * d * log T) per head, and only the index list is stored:
no (T / block)^2 intermediate. Query blocks that see at most ``top_k`` key blocks keep them
all and are not searched.

*Expanded search* (``expand_levels = E > 0``, a cheap candidate stage for the rescored
estimators): the same search with ``n_search / 2**E`` branches that stops as soon as every branch
spans at most ``2**E`` key blocks (per row: ``ceil(log2(ceil(range / branches))) - E`` rounds),
then keeps *every* block of its branches: up to ``n_search`` blocks, the neighbourhoods of the
narrow search's picks, for ``E`` fewer rounds of a ``2**E``-times narrower search than a search
with ``n_search`` branches. ``E = 0`` is the search above. Rows then hold fewer than ``top_k``
blocks when branches are shorter than ``2**E``; ``-1`` fills the end.
Measured as the rescored estimator's candidate stage: 8x cheaper, but a lower oracle ratio than
the default's wide search (figures in ``estimator_triton.py``); not a default anywhere.

GQA: the estimate is made per query head, reading the key head it shares.
This file is the readable reference and the test oracle of the Triton kernel.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import (
    UNUSED_SLOT,
    BlockGeometry,
    num_blocks,
    pad_to_blocks,
    query_blocks_per_chunk,
    sort_block_row,
    visible_key_blocks,
)
from sparse_lens.kernels.checks import check_attention_inputs


def stream_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    representative_keys: int = 8,
    expand_levels: int = 0,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Kept key blocks per query block, ascending, ``-1`` in unused slots (int64).

    ``expand_levels``: ``E > 0`` runs the expanded search (module doc).
    Raises ``ShapeError`` for malformed q / k and ``BlockSizeError`` / ``InvalidConfigError``
    for a bad block budget (``BlockGeometry``) or ``expand_levels``; ``representative_keys`` is
    capped at ``key_block``.
    """
    check_attention_inputs(query, key)
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    expanded_branches(geometry.n_search, expand_levels)
    return stream_estimate_unchecked(query, key, geometry, representative_keys=representative_keys,
                                     expand_levels=expand_levels)


def stream_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    representative_keys: int = 8,
    expand_levels: int = 0,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``stream_estimate`` on inputs the caller has validated (``estimate_blocks``)."""
    query_block, key_block, top_k = geometry.query_block, geometry.key_block, geometry.top_k
    sink_blocks, local_blocks = geometry.sink_blocks, geometry.local_blocks
    representative_keys = min(representative_keys, key_block)
    batch, n_q_heads, seq_len, d_head = query.shape
    n_query_blocks = num_blocks(seq_len, query_block)
    n_key_blocks = num_blocks(seq_len, key_block)
    n_search = geometry.n_search
    # Static facts (Python ints, so the function compiles with fullgraph=True): the first query
    # block that sees more than top_k key blocks, and the rounds that the widest search needs.
    first_searched = next(
        (j for j in range(n_query_blocks) if num_blocks(min((j + 1) * query_block, seq_len), key_block) > top_k),
        n_query_blocks,
    )
    n_rounds = geometry.search_rounds(seq_len)

    query_blocks: Float[Tensor, "batch q_head n_query_blocks query_block d_head"] = pad_to_blocks(
        query.float(), query_block
    ).unflatten(2, (n_query_blocks, query_block))
    key_blocks: Float[Tensor, "batch kv_head n_key_blocks key_block d_head"] = pad_to_blocks(
        key.float(), key_block
    ).unflatten(2, (n_key_blocks, key_block))
    n_visible: Int[Tensor, "n_query_blocks"] = visible_key_blocks(
        seq_len, query_block, key_block, device=query.device
    )

    scratch_per_query_block = batch * n_q_heads * 2 * max(n_search, 1) * query_block * representative_keys * 4 * 3
    chunk = query_blocks_per_chunk(scratch_per_query_block)
    slot = torch.arange(top_k, device=query.device)
    keep_all = torch.where(slot < n_visible[:first_searched, None], slot, torch.full_like(slot, UNUSED_SLOT))
    rows = [keep_all.expand(batch, n_q_heads, first_searched, top_k)]
    for first in range(first_searched, n_query_blocks, chunk):
        block_ids = torch.arange(first, min(first + chunk, n_query_blocks), device=query.device)
        rows.append(
            _estimate_chunk(
                query_blocks[:, :, block_ids],
                key_blocks,
                block_ids,
                n_visible[block_ids],
                seq_len=seq_len,
                query_block=query_block,
                key_block=key_block,
                top_k=top_k,
                sink_blocks=sink_blocks,
                local_blocks=local_blocks,
                n_rounds=n_rounds,
                representative_keys=representative_keys,
                expand_levels=expand_levels,
            )
        )
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


def _estimate_chunk(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    key_blocks: Float[Tensor, "batch kv_head n_key_blocks key_block d_head"],
    block_ids: Int[Tensor, "chunk"],
    n_visible: Int[Tensor, "chunk"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    n_rounds: int,
    representative_keys: int,
    expand_levels: int = 0,
) -> Int[Tensor, "batch q_head chunk top_k"]:
    """Search rows for query blocks that all see more than ``top_k`` key blocks."""
    batch, n_q_heads, n_chunk = query_blocks.shape[:3]
    device = query_blocks.device
    slot = torch.arange(top_k, device=device)
    n_search = expanded_branches(top_k - sink_blocks - local_blocks, expand_levels)
    sinks = slot[:sink_blocks].expand(n_chunk, sink_blocks)
    locals_ = n_visible[:, None] - local_blocks + slot[:local_blocks]
    fixed = torch.cat([sinks, locals_], dim=-1).expand(batch, n_q_heads, n_chunk, -1)

    if n_search > 0:
        # Searched range [sink_blocks, n_visible - local_blocks), split into n_search branches.
        range_len = n_visible - local_blocks - sink_blocks
        branch = torch.arange(n_search, device=device)
        start = sink_blocks + (branch * range_len[:, None]) // n_search
        end = sink_blocks + ((branch + 1) * range_len[:, None]) // n_search
        start = start.expand(batch, n_q_heads, n_chunk, n_search)
        end = end.expand(batch, n_q_heads, n_chunk, n_search)
        if expand_levels > 0:  # data-dependent round count: not under torch.compile(fullgraph=True)
            row_rounds = expanded_rounds(n_visible, sink_blocks, local_blocks, n_search, expand_levels)
            n_rounds = int(row_rounds.max())
        for level in range(n_rounds):
            mid = start + (end - start + 1) // 2
            cand_start = torch.cat([start, mid], dim=-1)
            cand_end = torch.cat([mid, end], dim=-1)
            score = score_branches_by_center_block(
                query_blocks, key_blocks, block_ids, cand_start, cand_end,
                seq_len=seq_len, query_block=query_block, key_block=key_block,
                representative_keys=representative_keys,
            )
            best = score.topk(n_search, dim=-1).indices
            if expand_levels == 0:
                start, end = cand_start.gather(-1, best), cand_end.gather(-1, best)
            else:  # rows whose branches already span <= 2**E blocks stop
                searching = (level < row_rounds)[:, None]
                start = torch.where(searching, cand_start.gather(-1, best), start)
                end = torch.where(searching, cand_end.gather(-1, best), end)
        if expand_levels == 0:
            row = torch.cat([fixed, start], dim=-1)
        else:  # every block of every branch, -1 past a branch's end
            blocks = start[..., None] + torch.arange(1 << expand_levels, device=device)
            blocks = torch.where(blocks < end[..., None], blocks, torch.full_like(blocks, UNUSED_SLOT))
            row = torch.cat([fixed, blocks.flatten(-2)], dim=-1)
    else:
        row = fixed
    return sort_block_row(row)


def score_branches_by_center_block(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    key_blocks: Float[Tensor, "batch kv_head n_key_blocks key_block d_head"],
    block_ids: Int[Tensor, "chunk"],
    cand_start: Int[Tensor, "batch q_head chunk n_cand"],
    cand_end: Int[Tensor, "batch q_head chunk n_cand"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    representative_keys: int,
) -> Float[Tensor, "batch q_head chunk n_cand"]:
    """Score of each candidate key-block range: max causal ``q . k`` over its centre block's
    ``representative_keys`` evenly strided keys. Empty ranges score ``-inf``."""
    batch, n_q_heads = query_blocks.shape[:2]
    n_kv_heads, n_key_blocks = key_blocks.shape[1], key_blocks.shape[2]
    group = n_q_heads // n_kv_heads
    center = (cand_start + (cand_end - cand_start - 1) // 2).clamp(0, n_key_blocks - 1)
    kv_head = torch.arange(n_q_heads, device=center.device) // group
    batch_idx = torch.arange(batch, device=center.device)
    stride = key_block // representative_keys
    offsets = torch.arange(representative_keys, device=center.device) * stride + (key_block - 1 - (representative_keys - 1) * stride) // 2
    sampled = key_blocks[:, :, :, offsets]
    rep_keys: Float[Tensor, "batch q_head chunk n_cand rep_keys d_head"] = sampled[
        batch_idx[:, None, None, None], kv_head[None, :, None, None], center
    ]
    scores = torch.einsum("bhjqd,bhjckd->bhjcqk", query_blocks, rep_keys)
    query_pos = (block_ids[:, None] * query_block + torch.arange(query_block, device=center.device))
    key_pos = center[..., None] * key_block + offsets
    causal = (key_pos[..., None, :] <= query_pos[None, None, :, None, :, None]) & (
        query_pos[None, None, :, None, :, None] < seq_len
    )
    best = scores.masked_fill(~causal, float("-inf")).amax(dim=(-1, -2))
    return best.masked_fill(cand_end <= cand_start, float("-inf"))
