"""Exact dense causal attention, computed chunk by chunk so that no T x T tensor exists.

The torch references of the truth sparse_lens measures against: ``mode="observe"`` (the model
runs dense attention while the sparse estimate is recorded) and the fidelity harness (dense
block masses, the exact top-k oracle). Time is quadratic in T; memory is O(T * chunk) per head.
They run on the CPU and are the test oracles of the fast paths: ``dense_sdpa`` (torch's fused
SDPA kernels, with their log-sum-exp) and ``block_mass_triton`` (block masses).

``window``, ``softcap`` and ``sinks`` (keyword-only, default off) are the sliding window, logit
soft-capping and attention sinks of ``sparse_attention`` (see its module docstring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import num_blocks, pad_to_blocks, query_blocks_per_chunk
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs


def dense_attention(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    *,
    scale: float,
    query_offset: int = 0,
    query_chunk: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> tuple[Float[Tensor, "batch q_head seq d_value"], Float[Tensor, "batch q_head seq"]]:
    """Causal softmax attention over all keys: ``(output, lse)``, exact, O(T * chunk) memory.

    ``query_offset``: position of the first query when the queries are the last ones of the
    keys' sequence (decoding with a KV cache); ``key`` then has ``query_offset`` more positions.
    ``window`` / ``softcap`` / ``sinks``: see the module docstring (``lse`` includes the sink).
    """
    check_attention_inputs(query, key, value, query_offset=query_offset)
    check_attention_features(window, softcap, sinks, query.shape[1])
    outputs, lses = [], []
    for rows, scores in _dense_scores_by_chunk(
        query, key, scale=scale, query_chunk=query_chunk, query_offset=query_offset, window=window, softcap=softcap
    ):
        if sinks is None:
            lse = torch.logsumexp(scores, dim=-1)
        else:  # scores: [batch, kv_head, group, rows, keys]; the sink is one more column
            sink_column = sinks.float().unflatten(0, scores.shape[1:3])[None, :, :, None, None]
            lse = torch.logsumexp(torch.cat([scores, sink_column.expand(*scores.shape[:-1], 1)], dim=-1), dim=-1)
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
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch q_head n_query_blocks n_key_blocks"]:
    """Dense softmax mass of every (query block, key block), averaged over the block's queries.

    Memory is (T / query_block) x (T / key_block) per head: for analysis at moderate lengths.
    At length, stream it by rows (``block_mass_rows``, ``oracle.oracle_blocks``).
    """
    n_query_blocks = num_blocks(query.shape[2], query_block)
    rows = torch.arange(n_query_blocks, device=query.device)
    mass = block_mass_rows(query, key, lse, rows, query_block=query_block, key_block=key_block, scale=scale,
                           window=window, softcap=softcap)
    return F.pad(mass, (0, num_blocks(query.shape[2], key_block) - mass.shape[-1]))


def block_mass_rows(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    lse: Float[Tensor, "batch q_head seq"],
    rows: Int[Tensor, "n_rows"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch q_head n_rows n_key_blocks"]:
    """Dense mass of every key block for the query blocks ``rows`` (ascending block ids).

    ``mass[.., r, b] = mean over the queries t of block rows[r] of sum over the keys k <= t of
    block b of exp(s_tk - lse_t)``, ``s = scale * q_t . k`` (soft-capped with ``softcap``; keys
    ``k <= t - window`` excluded with ``window``; a sink is part of the given ``lse``). ``n_key_blocks`` is the number of key blocks the
    last of ``rows`` sees; blocks a row does not see get 0. Computed a few query blocks at a time
    (O(chunk * T) memory per head); reference of ``block_mass_triton.block_mass_rows_triton``.
    """
    check_attention_inputs(query, key)
    check_attention_features(window, softcap, None, query.shape[1])
    batch, n_q_heads, seq_len, _ = query.shape
    n_kv_heads = key.shape[1]
    rows = rows.to(device=query.device, dtype=torch.int64)
    last_query = min((int(rows.max()) + 1) * query_block, seq_len) - 1 if rows.numel() else 0
    n_key_blocks = last_query // key_block + 1
    keys = key[:, :, : last_query + 1].float()
    query_blocks = pad_to_blocks(query.float(), query_block).unflatten(2, (-1, query_block))
    lse_blocks = pad_to_blocks(lse.float()[..., None], query_block).squeeze(-1).unflatten(2, (-1, query_block))
    key_pos = torch.arange(keys.shape[2], device=query.device)
    chunk = query_blocks_per_chunk(batch * n_q_heads * query_block * keys.shape[2] * 4 * 3)
    masses = []
    for first in range(0, rows.numel(), chunk):
        ids = rows[first : first + chunk]
        # keys after the chunk's last query are masked for all of its rows: not scored at all
        seen_keys = min(-(-min((int(ids.max()) + 1) * query_block, seq_len) // key_block) * key_block, keys.shape[2])
        grouped = query_blocks[:, :, ids].unflatten(1, (n_kv_heads, -1))  # [batch, kv, group, chunk, qb, d]
        scores = torch.einsum("bhgcqd,bhkd->bhgcqk", grouped, keys[:, :, :seen_keys]).mul_(scale)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        query_pos = ids[:, None] * query_block + torch.arange(query_block, device=query.device)
        row_lse = lse_blocks[:, :, ids].unflatten(1, (n_kv_heads, -1))
        seen = torch.isfinite(row_lse) & (query_pos < seq_len)
        visible = (key_pos[:seen_keys] <= query_pos[..., None]) & seen[..., None]
        if window is not None:
            visible &= key_pos[:seen_keys] > query_pos[..., None] - window
        scores = scores.sub_(torch.where(seen, row_lse, 0.0)[..., None]).masked_fill_(~visible, float("-inf"))
        per_query = pad_to_blocks(scores.exp_(), key_block, dim=-1).unflatten(-1, (-1, key_block)).sum(-1)
        per_block = F.pad(per_query.sum(-2), (0, n_key_blocks - per_query.shape[-1]))
        n_real = (seq_len - ids * query_block).clamp(max=query_block).to(per_block.dtype)
        masses.append((per_block / n_real[:, None]).flatten(1, 2))
    if not masses:
        return query.new_zeros((batch, n_q_heads, 0, n_key_blocks), dtype=torch.float32)
    return torch.cat(masses, dim=2)


def _dense_scores_by_chunk(
    query: Tensor, key: Tensor, *, scale: float, query_chunk: int | None, query_offset: int = 0,
    window: int | None = None, softcap: float | None = None,
):
    """Yield ``(rows, scores)``: float32 scores [batch, kv_head, group, rows, keys], causal-masked
    (and window-masked, soft-capped when asked).

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
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        key_pos, query_pos = torch.arange(n_keys, device=query.device)[None, :], query_offset + rows[:, None]
        visible = key_pos <= query_pos
        if window is not None:
            visible &= key_pos > query_pos - window
        yield rows, scores.masked_fill(~visible, float("-inf"))
