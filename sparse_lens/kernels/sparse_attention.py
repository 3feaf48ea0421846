"""Block-sparse attention, torch reference (the oracle of the Triton kernel).

Each query attends to the keys of its query block's kept key blocks only (causally, so only
keys at or before its own position), with the softmax renormalised over those keys. Computed
chunk by chunk over query blocks: memory is O(T * top_k * key_block) per head, and no T x T
tensor exists.

Besides the output it returns what analysis needs: the log-sum-exp (the exact softmax
normaliser of each query) and the block mass (probability that each kept block receives,
averaged over the query block's queries). Rows whose query sees no kept key (possible only
when the diagonal block is not kept) give a zero output and ``lse = -inf`` (``lse = sink`` with sinks).

Optional features (keyword-only, every function alike; the defaults change nothing):

- ``window``: sliding window in tokens, query ``i`` sees key ``j`` iff ``i - window < j <= i``
  (HF's convention), masked token by token inside the kept blocks like the causal mask.
- ``softcap``: logit soft-capping, the scores ``s = scale * q.k`` become
  ``softcap * tanh(s / softcap)`` before the softmax (Gemma 2); masses, ``lse`` and the
  gradients follow the capped scores.
- ``sinks``: learned attention sinks, one logit per query head added to each query's softmax
  normaliser only (gpt-oss): ``lse = log(sum_j exp(s_j) + exp(sink))``, the sink's probability
  ``exp(sink - lse)`` is dropped (a row's kept mass sums to ``1 - exp(sink - lse)``). Autograd
  gives ``d sinks``. The mass functions take ``lse`` as given, so the sink enters them through it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import num_blocks, pad_to_blocks, query_blocks_per_chunk
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs, check_block_indices


def block_sparse_attention(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    block_gate: Float[Tensor, "batch q_head n_query_blocks top_k"] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> tuple[
    Float[Tensor, "batch q_head seq d_value"],
    Float[Tensor, "batch q_head seq"],
    Float[Tensor, "batch q_head n_query_blocks top_k"],
]:
    """Attention restricted to the kept key blocks: ``(output, lse, block_mass)``.

    ``block_gate`` (optional) multiplies each kept block's attention probabilities after the
    softmax, so that ``output = sum_b gate_b * P_b @ V_b``; with gates of 1 it changes nothing.
    ``lse`` and ``block_mass`` describe the ungated softmax. ``window``, ``softcap``, ``sinks``:
    see the module docstring; differentiable w.r.t. q, k, v, ``block_gate`` and ``sinks``.
    """
    check_attention_inputs(query, key, value)
    check_attention_features(window, softcap, sinks, query.shape[1])
    seq_len = query.shape[2]
    n_query_blocks = num_blocks(seq_len, query_block)
    check_block_indices(block_indices, query, n_query_blocks)
    outputs, lses, masses = [], [], []
    for block_ids, scores, value_slots in kept_scores_by_chunk(
        query, key, block_indices, query_block=query_block, key_block=key_block, scale=scale,
        value=value, window=window, softcap=softcap,
    ):
        flat_scores = scores.flatten(-2)
        if sinks is None:
            lse: Float[Tensor, "batch q_head chunk query_block"] = torch.logsumexp(flat_scores, dim=-1)
            # A query that sees no kept key has an all -inf row: softmax gives NaN, we want 0.
            probs = torch.softmax(flat_scores, dim=-1).nan_to_num(0.0)
        else:  # the sink is one more column of the normaliser, with no value
            sink_column = sinks.float()[None, :, None, None, None].expand(*flat_scores.shape[:-1], 1)
            lse = torch.logsumexp(torch.cat([flat_scores, sink_column], dim=-1), dim=-1)
            probs = torch.exp(flat_scores - lse[..., None])
        probs = probs.unflatten(-1, scores.shape[-2:])
        masses.append(_mean_over_queries(probs.sum(-1), block_ids, query_block, seq_len))
        if block_gate is not None:
            probs = probs * block_gate[:, :, block_ids, None, :, None].to(probs.dtype)
        out = torch.matmul(probs.flatten(-2), value_slots.flatten(-3, -2))
        outputs.append(out.flatten(2, 3))
        lses.append(lse.flatten(2, 3))
    output = torch.cat(outputs, dim=2)[:, :, :seq_len].to(query.dtype)
    return output, torch.cat(lses, dim=2)[:, :, :seq_len], torch.cat(masses, dim=2)


def kept_block_mass(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    lse: Float[Tensor, "batch q_head seq"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch q_head n_query_blocks top_k"]:
    """Mass of each kept block under a given normaliser (e.g. the dense one), averaged over queries.

    ``window`` / ``softcap`` as in ``block_sparse_attention``; a sink is part of the given ``lse``.
    """
    check_attention_inputs(query, key)
    check_attention_features(window, softcap, None, query.shape[1])
    seq_len = query.shape[2]
    check_block_indices(block_indices, query, num_blocks(seq_len, query_block))
    lse_blocks = pad_to_blocks(lse.float()[..., None], query_block).squeeze(-1)
    lse_blocks = lse_blocks.unflatten(2, (-1, query_block))
    masses = []
    for block_ids, scores, _ in kept_scores_by_chunk(
        query, key, block_indices, query_block=query_block, key_block=key_block, scale=scale,
        window=window, softcap=softcap,
    ):
        probs = probs_from_lse(scores, lse_blocks[:, :, block_ids])
        masses.append(_mean_over_queries(probs.sum(-1), block_ids, query_block, seq_len))
    return torch.cat(masses, dim=2)


def kept_token_probs(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    lse: Float[Tensor, "batch q_head seq"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch q_head seq seq"]:
    """Token-level probabilities ``exp(s - lse)`` on kept entries, 0 elsewhere.

    ``s = scale * q.k``, soft-capped with ``softcap``; entries outside ``window`` are 0.

    Quadratic in memory: only for short sequences (``BlockSparsePattern.token_probs`` guards it).
    """
    batch, n_q_heads, seq_len, _ = query.shape
    n_key_blocks = num_blocks(seq_len, key_block)
    lse_blocks = pad_to_blocks(lse.float()[..., None], query_block).squeeze(-1)
    lse_blocks = lse_blocks.unflatten(2, (-1, query_block))
    n_query_blocks = num_blocks(seq_len, query_block)
    # One spare key block past the end receives the unused slots (-1); it is cut off below.
    dense = query.new_zeros(
        (batch, n_q_heads, n_query_blocks, query_block, (n_key_blocks + 1) * key_block),
        dtype=torch.float32,
    )
    for block_ids, scores, _ in kept_scores_by_chunk(
        query, key, block_indices, query_block=query_block, key_block=key_block, scale=scale,
        window=window, softcap=softcap,
    ):
        probs = probs_from_lse(scores, lse_blocks[:, :, block_ids])
        slots = block_indices[:, :, block_ids]
        slots = torch.where(slots < 0, n_key_blocks, slots)
        columns = slots[:, :, :, None, :, None] * key_block + torch.arange(key_block, device=query.device)
        rows = dense[:, :, int(block_ids[0]) : int(block_ids[-1]) + 1]
        rows.scatter_(-1, columns.expand(probs.shape).flatten(-2), probs.flatten(-2))
    dense = dense.flatten(2, 3)
    return dense[:, :, :seq_len, :seq_len]


def kept_scores_by_chunk(
    query: Tensor,
    key: Tensor,
    block_indices: Tensor,
    *,
    query_block: int,
    key_block: int,
    scale: float,
    value: Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
):
    """Yield ``(block_ids, scores, value_slots)`` per chunk of query blocks.

    ``scores``: float32 [batch, q_head, chunk, query_block, top_k, key_block], soft-capped if
    ``softcap``, ``-inf`` where the key is not visible (unused slot, after the query, outside
    the ``window``, or the query is padding). ``value_slots``:
    [batch, q_head, chunk, top_k, key_block, d_value] or None.
    """
    batch, n_q_heads, seq_len, d_head = query.shape
    n_kv_heads = key.shape[1]
    top_k = block_indices.shape[-1]
    n_query_blocks = num_blocks(seq_len, query_block)
    n_key_blocks = num_blocks(seq_len, key_block)
    device = query.device
    query_blocks = pad_to_blocks(query, query_block).unflatten(2, (n_query_blocks, query_block))
    key_blocks = pad_to_blocks(key, key_block).unflatten(2, (n_key_blocks, key_block))
    value_blocks = None if value is None else pad_to_blocks(value, key_block).unflatten(2, (n_key_blocks, key_block))
    kv_head = torch.arange(n_q_heads, device=device) // (n_q_heads // n_kv_heads)
    batch_idx = torch.arange(batch, device=device)
    d_value = 0 if value is None else value.shape[-1]
    bytes_per_query_block = batch * n_q_heads * top_k * key_block * (4 * query_block * 3 + 4 * (d_head + d_value))
    chunk = query_blocks_per_chunk(bytes_per_query_block)
    for first in range(0, n_query_blocks, chunk):
        block_ids = torch.arange(first, min(first + chunk, n_query_blocks), device=device)
        slots = block_indices[:, :, block_ids]
        safe_slots = slots.clamp(min=0)
        gather_at = (batch_idx[:, None, None, None], kv_head[None, :, None, None], safe_slots)
        keys = key_blocks[gather_at].flatten(-3, -2).float()  # [batch, q_head, chunk, top_k * key_block, d]
        scores = torch.matmul(query_blocks[:, :, block_ids].float(), keys.transpose(-1, -2)).mul_(scale)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = block_ids[:, None] * query_block + torch.arange(query_block, device=device)
        key_pos = safe_slots[..., None] * key_block + torch.arange(key_block, device=device)
        key_pos = torch.where(slots[..., None] >= 0, key_pos, seq_len).flatten(-2)  # unused slot: never visible
        hidden = (key_pos[:, :, :, None, :] > query_pos[None, None, :, :, None]) | (
            query_pos >= seq_len
        )[None, None, :, :, None]
        if window is not None:
            hidden |= key_pos[:, :, :, None, :] <= query_pos[None, None, :, :, None] - window
        scores = scores.masked_fill_(hidden, float("-inf")).unflatten(-1, (top_k, key_block))
        value_slots = None if value_blocks is None else value_blocks[gather_at].float()
        yield block_ids, scores, value_slots


def probs_from_lse(scores: Tensor, lse: Tensor) -> Tensor:
    """``exp(scores - lse)`` with rows of ``lse = -inf`` (nothing visible) set to 0."""
    lse = lse[..., None, None]
    finite = torch.isfinite(lse)
    return torch.where(finite, torch.exp(scores - torch.where(finite, lse, 0.0)), 0.0)


def _mean_over_queries(
    per_query: Float[Tensor, "batch q_head chunk query_block top_k"],
    block_ids: Tensor,
    query_block: int,
    seq_len: int,
) -> Float[Tensor, "batch q_head chunk top_k"]:
    """Average over the real (non-padding) queries of each query block."""
    n_real = (seq_len - block_ids * query_block).clamp(max=query_block).to(per_query.dtype)
    return per_query.sum(dim=3) / n_real[:, None]
