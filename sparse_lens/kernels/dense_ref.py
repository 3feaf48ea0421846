"""Exact dense causal attention, computed chunk by chunk so that no T x T tensor exists.

Used where sparse_lens needs the truth: ``mode="observe"`` (the model runs dense attention while
the sparse estimate is recorded) and the fidelity harness (dense block masses, the exact top-k
oracle). Time is quadratic in T; memory is O(T * chunk) per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparse_lens.kernels.blocks import num_blocks, pad_to_blocks, query_blocks_per_chunk
from sparse_lens.kernels.checks import check_attention_inputs


def dense_attention(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    *,
    scale: float,
    query_offset: int = 0,
    query_chunk: int | None = None,
) -> tuple[Float[Tensor, "batch q_head seq d_value"], Float[Tensor, "batch q_head seq"]]:
    """Causal softmax attention over all keys: ``(output, lse)``, exact, O(T * chunk) memory.

    ``query_offset``: position of the first query when the queries are the last ones of the
    keys' sequence (decoding with a KV cache); ``key`` then has ``query_offset`` more positions.
    """
    check_attention_inputs(query, key, value, query_offset=query_offset)
    outputs, lses = [], []
    for rows, scores in _dense_scores_by_chunk(
        query, key, scale=scale, query_chunk=query_chunk, query_offset=query_offset
    ):
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None])
        outputs.append(torch.einsum("bhgqk,bhkd->bhgqd", probs, value.float()[..., : scores.shape[-1], :]))
        lses.append(lse)
    output = torch.cat(outputs, dim=-2).flatten(1, 2)
    lse = torch.cat(lses, dim=-1).flatten(1, 2)
    return output.to(query.dtype), lse


def dense_block_mass(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    lse: Float[Tensor, "batch q_head seq"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
) -> Float[Tensor, "batch q_head n_query_blocks n_key_blocks"]:
    """Dense softmax mass of every (query block, key block), averaged over the block's queries.

    Memory is (T / query_block) x (T / key_block) per head: for analysis at moderate lengths.
    """
    check_attention_inputs(query, key)
    batch, n_q_heads, seq_len, _ = query.shape
    n_key_blocks = num_blocks(seq_len, key_block)
    lse = lse.float().unflatten(1, (key.shape[1], -1))
    per_query = []
    for rows, scores in _dense_scores_by_chunk(query, key, scale=scale, query_chunk=query_block):
        probs = torch.exp(scores - lse[..., rows, None])
        probs = pad_to_blocks(probs, key_block, dim=-1)
        per_query.append(probs.unflatten(-1, (-1, key_block)).sum(-1))
    mass = torch.cat([F.pad(m, (0, n_key_blocks - m.shape[-1])) for m in per_query], dim=-2)
    mass = pad_to_blocks(mass.flatten(1, 2), query_block, dim=-2)
    n_real = (seq_len - torch.arange(num_blocks(seq_len, query_block), device=query.device) * query_block)
    n_real = n_real.clamp(max=query_block).to(mass.dtype)
    return mass.unflatten(2, (-1, query_block)).sum(3) / n_real[:, None]


def _dense_scores_by_chunk(
    query: Tensor, key: Tensor, *, scale: float, query_chunk: int | None, query_offset: int = 0
):
    """Yield ``(rows, scores)``: float32 scores [batch, kv_head, group, rows, keys], causal-masked.

    ``rows`` index the queries; only keys up to the chunk's last query position are included,
    so a chunk's scores are [rows, query_offset + last_row + 1] wide.
    """
    batch, n_q_heads, seq_len, d_head = query.shape
    n_kv_heads = key.shape[1]
    grouped = query.float().unflatten(1, (n_kv_heads, n_q_heads // n_kv_heads))
    key = key.float()
    if query_chunk is None:  # at most 128 query rows at a time, fewer if a row of scores is large
        query_chunk = min(128, query_blocks_per_chunk(batch * n_q_heads * key.shape[2] * 4 * 3))
    for first in range(0, seq_len, query_chunk):
        rows = torch.arange(first, min(first + query_chunk, seq_len), device=query.device)
        n_keys = query_offset + int(rows[-1]) + 1
        scores = torch.einsum("bhgqd,bhkd->bhgqk", grouped[:, :, :, rows], key[:, :, :n_keys]) * scale
        causal = torch.arange(n_keys, device=query.device)[None, :] <= query_offset + rows[:, None]
        yield rows, scores.masked_fill(~causal, float("-inf"))
