"""Strictly causal block selection for every estimator: *lagged selection*.

The problem. An estimator chooses the key blocks of query block ``b`` from all of ``b``'s
queries. The attention kernels mask causally, but the *choice* for a query at position ``p`` then
depends on the queries at ``p + 1 .. end of its block``: changing token ``p + 1`` can change
which key blocks position ``p`` reads, and so its output. A sparse model is then not causal inside
a query block (token-level patching shows effects flowing backwards; next-token metrics are taken
on logits that have seen the token they predict).

The construction (generic: the estimator runs unchanged, only its rows are rearranged).
Let the *band* of query block ``b`` be the key blocks overlapping ``b`` itself,
``[s_b / key_block, last key block b sees]`` with ``s_b = floor(b * query_block / key_block) *
key_block`` the first position of the band: ``ceil(query_block / key_block)`` blocks (one when
``key_block > query_block``). Let ``r(b) = s_b / query_block - 1``, the last query block that
ends at or before ``s_b`` (``b - 1`` when ``key_block <= query_block``). Row ``b`` becomes::

    row(b) = estimated_row(r(b))  united with  band(b)          (ascending, -1 padded)

and rows that see at most ``top_k`` key blocks keep all of them, as before.

Why it is causal. Every estimator chooses row ``r`` from the queries of query block ``r`` and
the keys of the key blocks ``r`` sees (they all mask causally or read whole key blocks at or
before ``r``'s diagonal), i.e. from positions before the end of the last key block ``r`` sees,
``ceil((r + 1) * query_block / key_block) * key_block <= s_b``. So the blocks a query of block
``b`` reads are chosen from tokens before ``s_b``, at or before its own position; inside the kept
blocks the attention kernel masks causally. By induction over layers (q and k at a position only
depend on tokens up to it), every logit at position ``p`` depends only on tokens ``<= p``.
What a query block gives up: its own queries no longer steer its selection (the previous
query block's do), which costs fidelity where attention shifts at a block boundary
(``benchmarks/causal_selection.py`` measures it).

Budget. The inner estimator runs with ``top_k - n_band`` blocks (``causal_inner_budget``), so the
united row never exceeds ``top_k``; ``local_blocks`` keeps its meaning (blocks ending at
``b``'s diagonal: the band covers ``n_band`` of them, the inner estimator keeps the rest, ending at
``r(b)``'s diagonal), and the adaptive estimator's ``min_blocks`` counts the band.
Cost: one gather and one sort of ``[.., n_query_blocks, top_k]``: O(T * top_k / query_block).
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import (
    UNUSED_SLOT,
    BlockGeometry,
    keep_all_rows,
    num_blocks,
    sort_block_row,
    visible_key_blocks,
)


def band_blocks(query_block: int, key_block: int) -> int:
    """Key blocks overlapping one (full) query block: ``ceil(query_block / key_block)``."""
    return num_blocks(query_block, key_block)


def causal_inner_geometry(geometry: BlockGeometry) -> BlockGeometry:
    """The block budget of the inner estimator of lagged selection: ``top_k - n_band`` blocks,
    ``max(local_blocks - n_band, 0)`` local ones (the band covers the rest), same sinks.

    Raises:
        InvalidConfigError: ``top_k`` leaves no block for the inner estimator beside the band and
            the sink / remaining local blocks (raise ``top_k`` or turn causal selection off).
    """
    n_band = band_blocks(geometry.query_block, geometry.key_block)
    inner_top_k, inner_local = geometry.top_k - n_band, max(geometry.local_blocks - n_band, 0)
    if inner_top_k < max(1, geometry.sink_blocks + inner_local):
        raise InvalidConfigError(
            f"causal selection keeps the {n_band} key block(s) overlapping each query block and chooses "
            f"the rest with top_k - {n_band}: top_k={geometry.top_k} must be at least "
            f"{n_band + max(1, geometry.sink_blocks + inner_local)} "
            f"(sink_blocks={geometry.sink_blocks}, local_blocks={geometry.local_blocks}), "
            "or causal selection turned off (causal_selection=False)."
        )
    return geometry.replace(top_k=inner_top_k, local_blocks=inner_local)


def causal_inner_budget(
    *, query_block: int, key_block: int, top_k: int, sink_blocks: int, local_blocks: int, min_blocks: int
) -> dict[str, int]:
    """``top_k``, ``local_blocks`` and ``min_blocks`` for the inner estimator of lagged selection
    (``causal_inner_geometry`` for flat settings; ``min_blocks`` counts the band, floor 1).

    Raises:
        InvalidConfigError: as ``causal_inner_geometry`` (a ``ValueError``).
    """
    inner = causal_inner_geometry(BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks))
    n_band = band_blocks(query_block, key_block)
    return {"top_k": inner.top_k, "local_blocks": inner.local_blocks, "min_blocks": max(min_blocks - n_band, 1)}


def lagged_selection(
    inner_rows: Int[Tensor, "*batch n_query_blocks inner_top_k"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    top_k: int,
) -> Int[Tensor, "*batch n_query_blocks top_k"]:
    """Causal rows from an estimator's rows: row ``b`` = row ``r(b)`` of ``inner_rows`` united
    with ``b``'s band (see the module docstring); rows seeing ``<= top_k`` key blocks keep all.

    Args:
        inner_rows: Kept key blocks of every query block by any estimator run with
            ``causal_inner_budget``'s ``top_k`` (ascending or not, ``-1`` = unused slot).
        seq_len: Tokens ``T``.
        query_block, key_block: Block sizes in tokens.
        top_k: Width of the output rows (the configured budget).

    Returns:
        int64 kept key blocks, ascending, duplicates removed, ``-1`` in unused slots at the end.
    """
    device = inner_rows.device
    n_band = band_blocks(query_block, key_block)
    if inner_rows.shape[-1] + n_band > top_k:
        raise ValueError(f"inner rows of width {inner_rows.shape[-1]} plus a band of {n_band} exceed top_k={top_k}.")
    n_visible: Int[Tensor, "n_query_blocks"] = visible_key_blocks(seq_len, query_block, key_block, device=device)
    rows = torch.arange(len(n_visible), device=device)
    band_first = rows * query_block // key_block
    source_row = band_first * key_block // query_block - 1  # r(b); -1 only where b sees just its band
    lagged = inner_rows.index_select(-2, source_row.clamp(min=0))
    band = band_first[:, None] + torch.arange(n_band, device=device)
    band = torch.where(band < n_visible[:, None], band, torch.full_like(band, UNUSED_SLOT))
    union = sort_block_row(torch.cat([lagged, band.expand(*lagged.shape[:-1], n_band)], dim=-1))
    repeated = torch.cat([torch.zeros_like(union[..., :1], dtype=torch.bool), union[..., 1:] == union[..., :-1]], -1)
    union = sort_block_row(union.masked_fill(repeated & (union >= 0), UNUSED_SLOT))
    width = union.shape[-1]
    if width < top_k:
        union = torch.cat([union, union.new_full((*union.shape[:-1], top_k - width), UNUSED_SLOT)], dim=-1)
    keep_all = keep_all_rows(n_visible, top_k)
    return torch.where((n_visible <= top_k)[:, None], keep_all, union[..., :top_k]).to(torch.int64)
