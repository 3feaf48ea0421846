"""Stream estimator, torch reference: hierarchical top-k key-block selection per query block.

For every (batch, query head, query block) the estimator keeps ``top_k`` causal key blocks:
``sink_blocks`` at the start, ``local_blocks`` ending at the diagonal, and ``top_k - sink -
local`` found by a binary-search-style refinement over the key blocks in between:

1. split the searched range into ``n_search`` equal branches;
2. split every branch in two, score each half, keep the best ``n_search`` halves;
3. repeat until every branch is one key block (``BlockGeometry.search_rounds``, about
   ``log2(n_key_blocks / n_search)`` rounds).

The loop is ``search.hierarchical_search``, the package's one search loop (with the expanded
search below); Stream is that loop with this module's branch score,
``score_branches_by_center_block``. ``expanded_branches`` / ``expanded_rounds`` live there too.

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
the default's wide search (figures in ``stream_triton.py``); not a default anywhere.

GQA: the estimate is made per query head, reading the key head it shares.
This file is the readable reference and the test oracle of the Triton kernel.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import BlockGeometry, split_into_blocks
from sparse_lens.kernels.checks import check_attention_inputs
from sparse_lens.kernels.search import expanded_branches, expanded_rounds, hierarchical_search  # noqa: F401


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
    representative_keys = min(representative_keys, geometry.key_block)
    key_blocks: Float[Tensor, "batch kv_head n_key_blocks key_block d_head"] = split_into_blocks(key, geometry.key_block)
    seq_len = query.shape[2]

    def score(query_blocks, block_ids, cand_start, cand_end):
        return score_branches_by_center_block(
            query_blocks, key_blocks, block_ids, cand_start, cand_end, seq_len=seq_len,
            query_block=geometry.query_block, key_block=geometry.key_block, representative_keys=representative_keys)

    # scratch per candidate: [query_block, representative_keys] float32 scores, masks and positions
    return hierarchical_search(query, key, score, geometry, expand_levels=expand_levels,
                               bytes_per_candidate=3 * 4 * geometry.query_block * representative_keys)


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
