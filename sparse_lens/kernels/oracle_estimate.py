"""The exact top-k oracle as an estimator: ``estimate_blocks(..., estimator="oracle")``.

Per (head, query block) it keeps the sink and local blocks, exactly as every other estimator
does (``blocks.fixed_blocks``), and fills the remaining ``top_k - sink_blocks - local_blocks``
slots with the key blocks of largest *exact dense block mass* (the query block's dense softmax
mass on the block, averaged over its queries). No estimator using the same fixed blocks can keep
more mass at the same budget: it is the ceiling the other estimators are measured against, and
run inside the model (``StreamConfig(estimator="oracle")``) its end-to-end KL and top-1 are what
perfect block selection achieves. Through ``estimate_blocks(..., causal=True)`` it goes through
the same lagged selection (``causal.py``) as the others.

Cost: the dense log-sum-exp of every query (one dense attention pass, ``dispatch.dense_attention``)
plus the exact block masses (``oracle.oracle_blocks``, streamed a chunk of query blocks at a time):
O(T^2 * d_head) time, like dense attention, and O(T * top_k / query_block + chunk) memory; no
``[T, T]`` tensor. Meant for measurement, not for speed.

Why ``oracle_blocks`` with the full ``top_k`` gives the right answer: its ``top_k`` heaviest
blocks of a row hold at most ``sink_blocks + local_blocks`` fixed ones, hence at least ``n_search``
searchable ones, and every searchable block outside them weighs no more than each of them; so the
``n_search`` heaviest searchable blocks of that list are the ``n_search`` heaviest of the row
(ties aside, broken by ``torch.topk``).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import (
    check_estimator_settings,
    fixed_blocks,
    keep_all_rows,
    sort_block_row,
    visible_key_blocks,
)
from sparse_lens.kernels.checks import check_attention_inputs
from sparse_lens.kernels.dispatch import Backend, dense_attention
from sparse_lens.kernels.oracle import oracle_blocks


def oracle_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    scale: float | None = None,
    backend: Backend = "auto",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Sink and local blocks plus the ``top_k - sink_blocks - local_blocks`` key blocks of largest
    exact dense block mass in the rest of each row.

    Args:
        query: Rotated queries.
        key: Rotated keys (``kv_head`` divides ``q_head``: GQA).
        query_block, key_block: Block sizes in tokens (one divides the other).
        top_k: Key blocks kept per query block, sink and local blocks included; rows seeing at
            most ``top_k`` key blocks keep all of them.
        sink_blocks: Always-kept key blocks at the start of the sequence.
        local_blocks: Always-kept key blocks ending at the query block's diagonal.
        scale: Softmax scale (default ``d_head ** -0.5``); the dense masses use it.
        backend: Dense lse and block masses on Triton / fused SDPA or the torch reference
            (``dispatch.py``).

    Returns:
        int64 kept key blocks, ascending, ``-1`` in unused slots at the end of a row.

    Raises:
        ShapeError: Malformed q / k (``checks.check_attention_inputs``).
        ValueError: Inconsistent block settings (as every estimator).
    """
    check_attention_inputs(query, key)
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    batch, n_q_heads, seq_len, d_head = query.shape
    scale = d_head**-0.5 if scale is None else scale
    device = query.device
    n_visible: Int[Tensor, "n_query_blocks"] = visible_key_blocks(seq_len, query_block, key_block, device=device)
    searched_row = n_visible > top_k
    keep_all = keep_all_rows(n_visible, top_k).expand(batch, n_q_heads, -1, -1)
    if not bool(searched_row.any()):
        return keep_all.clone()
    _, lse = dense_attention(query, key, key, scale=scale, backend=backend)  # values unused: lse only
    rows = torch.nonzero(searched_row).flatten()
    heaviest, mass = oracle_blocks(query, key, lse, query_block=query_block, key_block=key_block, top_k=top_k,
                                   scale=scale, rows=rows, backend=backend)
    row_visible = n_visible[rows][:, None]
    searchable = (heaviest >= sink_blocks) & (heaviest < row_visible - local_blocks)
    n_search = top_k - sink_blocks - local_blocks
    pick = mass.masked_fill(~searchable, float("-inf")).topk(n_search, dim=-1).indices
    chosen = heaviest.gather(-1, pick)
    fixed = fixed_blocks(n_visible[rows], sink_blocks, local_blocks).expand(batch, n_q_heads, -1, -1)
    searched = sort_block_row(torch.cat([fixed, chosen], dim=-1))
    out = keep_all.clone()
    out[:, :, rows] = searched
    return out
