"""One-shot baselines (torch references): score every causal (query block, key block) pair, then
keep the top ``n_search`` of the searched range beside the sink and local blocks.

O(n_qb * n_kb) scores per head, i.e. O((T / block)^2) memory, not O(T log T): baselines from the
literature, measured against the hierarchical searches (same output contract, see
``search.py``).

- :func:`oneshot_pooled_estimate` (MInference / FlexPrefill style): mean query of each query
  block . mean key of each key block. Time O(n_qb * n_kb * D).
- :func:`antidiagonal_estimate` (after the XAttention paper's description; its code was not
  read): the sum of ``q . k`` over the antidiagonals of stride ``S`` inside each block pair
  (positions with ``(i + j) % S == S - 1``), optionally softmax-normalised per strided row.
  Time O(T^2 D / S), memory O((T / S)^2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import (
    BlockGeometry,
    fixed_blocks,
    keep_all_rows,
    num_blocks,
    pad_to_blocks,
    sort_block_row,
    split_into_blocks,
    tokens_per_block,
    visible_key_blocks,
)
from sparse_lens.kernels.checks import check_attention_inputs


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
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    return oneshot_pooled_estimate_unchecked(query, key, geometry)


def oneshot_pooled_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``oneshot_pooled_estimate`` on inputs the caller has validated (``estimate_blocks``)."""
    scores = pooled_block_scores(query, key, query_block=geometry.query_block, key_block=geometry.key_block)
    return top_k_of_block_scores(scores, seq_len=query.shape[2], **geometry.as_kwargs())


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
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    return antidiagonal_estimate_unchecked(query, key, geometry, stride=stride, normalize=normalize, scale=scale)


def antidiagonal_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    stride: int = 8,
    normalize: Literal["sum", "softmax"] = "sum",
    scale: float | None = None,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``antidiagonal_estimate`` on inputs the caller has validated (``estimate_blocks``)."""
    scores = antidiagonal_block_scores(query, key, query_block=geometry.query_block, key_block=geometry.key_block,
                                       stride=stride, normalize=normalize, scale=scale)
    return top_k_of_block_scores(scores, seq_len=query.shape[2], **geometry.as_kwargs())
