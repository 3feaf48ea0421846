"""Block-sparse attention backward, Triton: ``backward_kernel``, ``key_value_grad_kernel`` and
their launch ``launch_backward``.

Same grid and (slot, key tile) loop as the forward (``sparse_attention_fwd_triton``). With
``p = exp(s - lse)`` recomputed from the saved lse, ``g`` the slot's gate and
``delta = rowsum(dO * O)`` (equal to ``sum_j p_j dp_j`` also with gates, since
``O = sum_b g_b P_b V_b``): ``dp = g * dO V^T``, ``ds = p * (dp - delta)``, ``dq = scale * ds K``,
``dk = scale * ds^T Q``, ``dv = (g p)^T dO`` and ``d gate = sum(p * dO V^T)`` over the slot.
dq and d gate belong to one program and are stored plainly. A key block is kept by many query
blocks (and, with GQA, by several query heads), so dk and dv meet from many programs. By
default (``kv_chunk = 0``) each tile's dk and dv are added with ``tl.atomic_add`` into fp32
[batch, kv_head, seq, d] buffers (``top_k * key_block * (d + d_value)`` adds per query block).
With ``kv_chunk = n`` the backward kernel makes dq, d gate, d sinks and ``delta`` only, and
``key_value_grad_kernel`` makes dk and dv by key tile: ``_key_block_entries`` sorts the slots
by (kv row, key block) on the device (a stable argsort, a histogram and a search per call, with
no host synchronisation: a key head's programs are laid out for the most it can need, the unused
ones empty), one program per key tile and chunk of at most ``n`` of its block's slots sums their
dk, dv in registers and adds them once (chunks, because the sink block is kept by every query
block). That recomputes ``s`` and ``dp`` (7 tile products instead of 5) for far fewer atomics.
``dq_atomics`` (with ``kv_chunk``) turns that around as FlashAttention-2 does: the first kernel
makes ``delta`` (and d sinks) only and the key/value kernel also dq and d gate from its own tile
products (5 again), adding each slot's share with fp32 atomics (dq: ``query_block * d`` adds per slot
and key tile, against ``kv_chunk = 0``'s ``key_block * (d + d_value)`` dk / dv adds per slot and
query tile). Either way the fp32 buffers are cast to the input dtype at the end (dq: one GQA group
at a time), and the order of the fp32 sums (hence the last bits of dk, dv, and with ``dq_atomics``
of dq and d gate) varies from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.sparse_attention_launch import (
    KernelLaunch,
    backward_launch,
    feature_args,
    kernel_sizes,
    launch_config,
    launch_for_sizes,
    query_grid,
)
from sparse_lens.kernels.sparse_attention_tiles import (
    LOG2E,
    add_rows,
    block_and_head,
    dot,
    dot_into,
    kv_row,
    load_tile,
    scores_log2,
    step_tile_plan,
    store_rows,
    tile_plan,
    visibility,
)


@triton.jit
def _tile_gradients(
    queries, grad_out, keys, values, delta, lse_log2, key_pos, needs_mask, row_limit, query_pos, gate,
    scale, window, softcap, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FOLD_SCALE: tl.constexpr,
    MASK_ALL: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, KEYS_BY_ROWS: tl.constexpr = False,
):
    """``(probs, grad_probs, grad_scores)`` of a [query tile, key tile]: ``p = exp(s - lse)`` (0 where
    not visible), ``dp = dO V^T`` (ungated) and ``ds = p * (gate * dp - delta)`` (times the cap's
    derivative) with respect to the unscaled ``q . k``, up to the factor ``scale``.
    ``KEYS_BY_ROWS``: their transposes, [key tile, query tile], made as ``K Q^T`` and ``V dO^T``
    (so that ``dk += ds^T Q`` and ``dv += p^T dO`` take them as they are, no register transpose)."""
    if KEYS_BY_ROWS:
        scores, factor, capped = scores_log2(keys, queries, scale, softcap, HAS_SOFTCAP, FOLD_SCALE,
                                              DOT_PRECISION, DOT_UPCAST)
        probs = tl.exp2(scores * factor - lse_log2[None, :])
        grad_probs = dot(values, tl.trans(grad_out), DOT_PRECISION, DOT_UPCAST)
        centred = gate * grad_probs - delta[None, :]
    else:
        scores, factor, capped = scores_log2(queries, keys, scale, softcap, HAS_SOFTCAP, FOLD_SCALE,
                                              DOT_PRECISION, DOT_UPCAST)
        probs = tl.exp2(scores * factor - lse_log2[:, None])
        grad_probs = dot(grad_out, tl.trans(values), DOT_PRECISION, DOT_UPCAST)
        centred = gate * grad_probs - delta[:, None]
    if MASK_ALL:
        probs = tl.where(visibility(key_pos, query_pos, row_limit, window, HAS_WINDOW, KEYS_BY_ROWS), probs, 0.0)
    elif needs_mask:
        probs = tl.where(visibility(key_pos, query_pos, row_limit, window, HAS_WINDOW, KEYS_BY_ROWS), probs, 0.0)
    grad_scores = probs * centred
    if HAS_SOFTCAP:  # d capped / d s = 1 - tanh^2
        tanh = capped / softcap
        grad_scores = grad_scores * (1.0 - tanh * tanh)
    return probs, grad_probs, grad_scores


@triton.jit
def _backward_step(
    grad_query, gate_grad, queries, grad_out, delta, lse_log2, key_ptr, value_ptr, grad_key_ptr, grad_value_ptr,
    key_offset, value_offset, first_key, load_first_key, reached, needs_mask, row_limit, query_pos, slot, gate,
    scale, window, softcap, seq_len, d_head, d_value,
    KEY_TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SLOTS: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN: tl.constexpr,
    FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr, KV_GRADS: tl.constexpr, KV_EVICTION: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One key tile of the backward: the new ``(grad_query, gate_grad)``; with ``KV_GRADS`` dk and
    dv of the tile are added atomically (not at all where ``reached`` is false: the tile is
    invisible, its terms 0)."""
    tile_rows = tl.arange(0, KEY_TILE)
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    load_pos = load_first_key + tile_rows
    keys = load_tile(key_ptr + key_offset, load_pos, seq_len, dims, d_head, EVEN, KV_EVICTION)
    values = load_tile(value_ptr + value_offset, load_pos, seq_len, value_dims, d_value, EVEN, KV_EVICTION)
    probs, grad_probs, grad_scores = _tile_gradients(
        queries, grad_out, keys, values, delta, lse_log2, first_key + tile_rows, needs_mask, row_limit, query_pos,
        gate, scale, window, softcap, HAS_WINDOW, HAS_SOFTCAP, FOLD_SCALE, MASK_ALL, DOT_PRECISION, DOT_UPCAST)
    if HAS_GATE:
        slot_grad = tl.sum(tl.sum(probs * grad_probs, axis=1), axis=0)
        gate_grad += tl.where(tl.arange(0, SLOTS) == slot, slot_grad, 0.0)
    grad_query = dot_into(grad_scores.to(keys.dtype), keys, grad_query, DOT_PRECISION, DOT_UPCAST)
    if KV_GRADS:
        grad_key = dot(tl.trans(grad_scores).to(queries.dtype), queries, DOT_PRECISION, DOT_UPCAST)
        grad_value = dot(tl.trans(probs * gate).to(grad_out.dtype), grad_out, DOT_PRECISION, DOT_UPCAST)
        rows_to_add = tl.where(reached, load_pos, seq_len)  # none of an invisible tile
        add_rows(grad_key_ptr + key_offset, rows_to_add, seq_len, dims, d_head, grad_key * scale)
        add_rows(grad_value_ptr + value_offset, rows_to_add, seq_len, value_dims, d_value, grad_value)
    return grad_query, gate_grad


@triton.jit
def backward_kernel(
    query_ptr, key_ptr, value_ptr, block_indices_ptr, block_gate_ptr, sinks_ptr, output_ptr, grad_output_ptr,
    lse_ptr, grad_query_ptr, grad_key_ptr, grad_value_ptr, grad_gate_ptr, grad_sinks_ptr, delta_ptr,
    scale, window, softcap, seq_len, n_q_heads, n_kv_heads, n_query_blocks, top_k, d_head, d_value,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SLOTS: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr,
    SKIP_UNREACHED: tl.constexpr, MASK_ALL: tl.constexpr, HEADS_INNER: tl.constexpr, KV_GRADS: tl.constexpr,
    KV_EVICTION: tl.constexpr, ONCE_EVICTION: tl.constexpr, QUERY_GRADS: tl.constexpr = True,
):
    """One (query head, query block): ``delta`` (stored unless ``KV_GRADS``), d sinks, and with
    ``QUERY_GRADS`` dq and d gate (plain stores) and with ``KV_GRADS`` dk / dv (atomics). Without
    ``QUERY_GRADS`` (``KernelLaunch.dq_atomics``) the key/value kernel makes dq and d gate; delta
    and d sinks are still made here."""
    query_block_id, batch_head = block_and_head(n_q_heads, n_kv_heads, HEADS_INNER)
    kv_batch_head = kv_row(batch_head, n_q_heads, n_kv_heads)
    query_offset, key_offset = batch_head * seq_len * d_head, kv_batch_head * seq_len * d_head
    output_offset, value_offset = batch_head * seq_len * d_value, kv_batch_head * seq_len * d_value
    slots_row = (batch_head * n_query_blocks + query_block_id) * top_k
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    slot_ids = tl.arange(0, SLOTS)
    gate_grad = tl.zeros([SLOTS], dtype=tl.float32)
    TILES: tl.constexpr = KEY_BLOCK // KEY_TILE
    for query_tile in range(QUERY_BLOCK // QUERY_TILE):
        first_query = query_block_id * QUERY_BLOCK + query_tile * QUERY_TILE
        query_pos = first_query + tl.arange(0, QUERY_TILE)
        last_query = tl.minimum(first_query + QUERY_TILE, seq_len) - 1
        real = query_pos < seq_len
        row_limit = tl.where(real, query_pos, -1)
        grad_out = load_tile(grad_output_ptr + output_offset, query_pos, seq_len, value_dims, d_value, EVEN,
                              ONCE_EVICTION)
        output = load_tile(output_ptr + output_offset, query_pos, seq_len, value_dims, d_value, EVEN, ONCE_EVICTION)
        delta = tl.sum(grad_out.to(tl.float32) * output.to(tl.float32), axis=1)
        if not KV_GRADS:  # the key/value gradient kernel reads it
            tl.store(delta_ptr + batch_head * seq_len + query_pos, delta, mask=real)
        lse = tl.load(lse_ptr + batch_head * seq_len + query_pos, mask=real, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # such rows see no key: every p is 0 anyway
        if HAS_SINKS:  # d sink = -sum_t exp(sink - lse_t) * delta_t
            sink = tl.load(sinks_ptr + batch_head % n_q_heads).to(tl.float32)
            sink_grad = -tl.sum(tl.where(real, tl.exp(sink - lse) * delta, 0.0), axis=0)
            tl.atomic_add(grad_sinks_ptr + batch_head % n_q_heads, sink_grad, sem="relaxed")
        if QUERY_GRADS:
            queries = load_tile(query_ptr + query_offset, query_pos, seq_len, dims, d_head, EVEN,
                                ONCE_EVICTION)
            lse_log2 = lse * LOG2E
            grad_query = tl.zeros([QUERY_TILE, BLOCK_D], dtype=tl.float32)
            for step in tl.range(0, top_k * TILES):
                slot, reached, mask_first_key, load_first_key, needs_mask = step_tile_plan(
                    step, block_indices_ptr, slots_row, first_query, last_query, seq_len, window, KEY_BLOCK, TILES,
                    QUERY_TILE, KEY_TILE, HAS_WINDOW)
                gate = tl.load(block_gate_ptr + slots_row + slot).to(tl.float32) if HAS_GATE else 1.0
                if SKIP_UNREACHED:
                    if reached:
                        grad_query, gate_grad = _backward_step(
                            grad_query, gate_grad, queries, grad_out, delta, lse_log2, key_ptr, value_ptr,
                            grad_key_ptr, grad_value_ptr, key_offset, value_offset, mask_first_key, load_first_key,
                            reached, needs_mask, row_limit, query_pos, slot, gate, scale, window, softcap, seq_len,
                            d_head, d_value, KEY_TILE, BLOCK_D, BLOCK_DV, SLOTS, HAS_GATE, HAS_WINDOW, HAS_SOFTCAP,
                            EVEN, FOLD_SCALE, MASK_ALL, KV_GRADS, KV_EVICTION, DOT_PRECISION, DOT_UPCAST)
                else:
                    grad_query, gate_grad = _backward_step(
                        grad_query, gate_grad, queries, grad_out, delta, lse_log2, key_ptr, value_ptr, grad_key_ptr,
                        grad_value_ptr, key_offset, value_offset, mask_first_key, load_first_key, reached, needs_mask,
                        row_limit, query_pos, slot, gate, scale, window, softcap, seq_len, d_head, d_value, KEY_TILE,
                        BLOCK_D, BLOCK_DV, SLOTS, HAS_GATE, HAS_WINDOW, HAS_SOFTCAP, EVEN, FOLD_SCALE, MASK_ALL,
                        KV_GRADS, KV_EVICTION, DOT_PRECISION, DOT_UPCAST)
            store_rows(grad_query_ptr + query_offset, query_pos, seq_len, dims, d_head, grad_query * scale)
    if HAS_GATE and QUERY_GRADS:
        grad_gate_at = grad_gate_ptr + slots_row + slot_ids
        tl.store(grad_gate_at, gate_grad.to(grad_gate_ptr.dtype.element_ty), mask=slot_ids < top_k)


@triton.jit(do_not_specialize=["first_item", "first_sum_row"])  # one compile for every key head's launch
def key_value_grad_kernel(
    query_ptr, key_ptr, value_ptr, block_gate_ptr, grad_output_ptr, lse_ptr, delta_ptr,
    entry_slots_ptr, item_owners_ptr, item_starts_ptr, item_ends_ptr, grad_key_ptr, grad_value_ptr,
    grad_query_sums_ptr, grad_gate_sums_ptr, first_item, first_sum_row,
    scale, window, softcap, seq_len, n_key_blocks, n_query_blocks, top_k, d_head, d_value,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr,
    KV_EVICTION: tl.constexpr, ONCE_EVICTION: tl.constexpr, QUERY_GRADS: tl.constexpr = False,
):
    """dk and dv of one key tile over a chunk of the (query head, query block) slots that keep its
    block (``_key_block_entries``), summed in registers and added once (fp32 atomics: a block's
    chunks meet there). ``QUERY_GRADS`` (``KernelLaunch.dq_atomics``): also each slot's share of dq
    and d gate, added with fp32 atomics to ``grad_query_sums_ptr`` (fp32 [rows, seq, d_head]: query
    row ``r = batch * n_q_heads + q_head`` at row ``r - first_sum_row``) and ``grad_gate_sums_ptr``
    (fp32, like ``block_indices``), zero on entry. Program ``i`` runs item ``first_item + i``."""
    item = first_item + tl.program_id(0)
    owner = tl.load(item_owners_ptr + item).to(tl.int64)  # kv row * n_key_blocks + key block
    kv_batch_head, key_block_id = owner // n_key_blocks, owner % n_key_blocks
    first_key = key_block_id * KEY_BLOCK + tl.program_id(1) * KEY_TILE
    key_pos = first_key + tl.arange(0, KEY_TILE)
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    key_offset, value_offset = kv_batch_head * seq_len * d_head, kv_batch_head * seq_len * d_value
    # Here k and v are read once per program, q and dO by many programs (the L2 hints swap roles).
    keys = load_tile(key_ptr + key_offset, key_pos, seq_len, dims, d_head, EVEN, ONCE_EVICTION)
    values = load_tile(value_ptr + value_offset, key_pos, seq_len, value_dims, d_value, EVEN, ONCE_EVICTION)
    grad_key = tl.zeros([KEY_TILE, BLOCK_D], dtype=tl.float32)
    grad_value = tl.zeros([KEY_TILE, BLOCK_DV], dtype=tl.float32)
    for entry in tl.range(tl.load(item_starts_ptr + item), tl.load(item_ends_ptr + item)):
        slot_at = tl.load(entry_slots_ptr + entry).to(tl.int64)  # flat index into block_indices
        batch_head, query_block_id = slot_at // (n_query_blocks * top_k), (slot_at // top_k) % n_query_blocks
        gate = tl.load(block_gate_ptr + slot_at).to(tl.float32) if HAS_GATE else 1.0
        for query_tile in tl.static_range(QUERY_BLOCK // QUERY_TILE):
            first_query = query_block_id * QUERY_BLOCK + query_tile * QUERY_TILE
            query_pos = first_query + tl.arange(0, QUERY_TILE)
            last_query = tl.minimum(first_query + QUERY_TILE, seq_len) - 1
            real = query_pos < seq_len
            reached, mask_first_key, _, needs_mask = tile_plan(
                key_block_id, first_key, first_query, last_query, seq_len, window, QUERY_TILE, KEY_TILE, HAS_WINDOW)
            query_offset, output_offset = batch_head * seq_len * d_head, batch_head * seq_len * d_value
            queries = load_tile(query_ptr + query_offset, query_pos, seq_len, dims, d_head, EVEN, KV_EVICTION)
            grad_out = load_tile(grad_output_ptr + output_offset, query_pos, seq_len, value_dims, d_value, EVEN,
                                  KV_EVICTION)
            lse = tl.load(lse_ptr + batch_head * seq_len + query_pos, mask=real, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(delta_ptr + batch_head * seq_len + query_pos, mask=real, other=0.0)
            probs_t, grad_probs_t, grad_scores_t = _tile_gradients(  # [key tile, query tile]
                queries, grad_out, keys, values, delta, lse * LOG2E, mask_first_key + tl.arange(0, KEY_TILE),
                needs_mask, tl.where(real, query_pos, -1), query_pos, gate, scale, window, softcap,
                HAS_WINDOW, HAS_SOFTCAP, FOLD_SCALE, MASK_ALL, DOT_PRECISION, DOT_UPCAST, KEYS_BY_ROWS=True)
            if QUERY_GRADS:
                grad_query = dot(tl.trans(grad_scores_t).to(keys.dtype), keys, DOT_PRECISION, DOT_UPCAST)
                rows_to_add = tl.where(reached, query_pos, seq_len)  # none of an invisible tile
                sums_at = grad_query_sums_ptr + (batch_head - first_sum_row) * seq_len * d_head
                add_rows(sums_at, rows_to_add, seq_len, dims, d_head, grad_query * scale)
                if HAS_GATE:
                    slot_grad = tl.sum(tl.sum(probs_t * grad_probs_t, axis=1), axis=0)
                    tl.atomic_add(grad_gate_sums_ptr + slot_at, slot_grad, sem="relaxed")
            grad_key = dot_into(grad_scores_t.to(queries.dtype), queries, grad_key, DOT_PRECISION, DOT_UPCAST)
            grad_value = dot_into((probs_t * gate).to(grad_out.dtype), grad_out, grad_value,
                                   DOT_PRECISION, DOT_UPCAST)
    rows_to_add = tl.where(tl.load(item_starts_ptr + item) < tl.load(item_ends_ptr + item), key_pos, seq_len)
    add_rows(grad_key_ptr + key_offset, rows_to_add, seq_len, dims, d_head, grad_key * scale)  # none if empty
    add_rows(grad_value_ptr + value_offset, rows_to_add, seq_len, value_dims, d_value, grad_value)


def _key_block_entries(block_indices: Tensor, seq_len: int, query_block: int, key_block: int, n_kv_heads: int,
                       chunk: int) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], int]:
    """The slots of ``block_indices`` grouped by the key block they keep, for ``key_value_grad_kernel``,
    made without a host synchronisation (every shape follows from the inputs' shapes).

    Returns ``((entry_slots, item_owners, item_starts, item_ends), items_per_row)``: ``entry_slots``
    [batch * q_head * n_query_blocks * top_k] are flat indices into ``block_indices``, the used,
    causally reachable slots first, sorted by owner ``kv row * n_key_blocks + key block`` (kv row =
    batch * n_kv_heads + kv head: the query heads of a GQA group meet there), the other slots after
    them (never read). Item ``i`` (one program) is the entries ``[item_starts[i], item_ends[i])`` of
    owner ``item_owners[i]``, at most ``chunk`` of them (the sink block is kept by every query block:
    unchunked, its program would run alone for long). Kv row ``r``'s items are
    ``[r * items_per_row, (r + 1) * items_per_row)``: its real items first, then empty ones
    (``item_starts == item_ends``, which add nothing); ``items_per_row`` is the most a row can need
    (one chunk more per key block than its slots fill).
    """
    batch, n_q_heads, n_query_blocks, top_k = block_indices.shape
    device = block_indices.device
    n_key_blocks = num_blocks(seq_len, key_block)
    n_rows, group = batch * n_kv_heads, n_q_heads // n_kv_heads
    flat = block_indices.reshape(-1).long()
    slot_at = torch.arange(flat.numel(), device=device)
    query_row, query_block_id = slot_at // (n_query_blocks * top_k), (slot_at // top_k) % n_query_blocks
    last_query = torch.clamp((query_block_id + 1) * query_block, max=seq_len) - 1
    kept = (flat >= 0) & (flat * key_block <= last_query)
    key_row = (query_row // n_q_heads) * n_kv_heads + (query_row % n_q_heads) // group
    n_owners = n_rows * n_key_blocks
    owners = torch.where(kept, key_row * n_key_blocks + flat, n_owners)  # unkept slots: past every owner
    order = torch.argsort(owners, stable=True)
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    entry_slots = slot_at[order].to(index_dtype)
    counts = torch.zeros(n_owners + 1, dtype=torch.long, device=device).scatter_add_(
        0, owners, torch.ones_like(owners))[:n_owners]
    firsts = torch.cumsum(counts, 0) - counts
    n_chunks = ((counts + chunk - 1) // chunk).view(n_rows, n_key_blocks)
    chunk_ends = torch.cumsum(n_chunks, 1)  # per row, the items up to each key block's last
    items_per_row = -(-group * n_query_blocks * top_k // chunk) + n_key_blocks
    local = torch.arange(items_per_row, device=device).expand(n_rows, items_per_row).contiguous()
    key_block_of_item = torch.searchsorted(chunk_ends, local, right=True)  # n_key_blocks: an empty item
    real = key_block_of_item < n_key_blocks
    key_block_of_item = key_block_of_item.clamp(max=n_key_blocks - 1)
    owner = torch.arange(n_rows, device=device)[:, None] * n_key_blocks + key_block_of_item
    chunk_of_item = local - (chunk_ends.gather(1, key_block_of_item) - n_chunks.gather(1, key_block_of_item))
    item_starts = torch.where(real, firsts[owner] + chunk_of_item * chunk, 0)
    item_ends = torch.where(real, torch.minimum(item_starts + chunk, firsts[owner] + counts[owner]), 0)
    items = (entry_slots, owner.reshape(-1).to(index_dtype), item_starts.reshape(-1).to(index_dtype),
             item_ends.reshape(-1).to(index_dtype))
    return items, items_per_row


@launch_on_tensor_device
def launch_backward(query, key, value, block_indices, block_gate, output, grad_output, lse,
                    grad_query, grad_key, grad_value, grad_gate, *, query_block: int, key_block: int,
                    scale: float, window: int | None = None, softcap: float | None = None,
                    sinks: Tensor | None = None, grad_sinks: Tensor | None = None,
                    launch: KernelLaunch | None = None) -> None:
    """Run the backward kernel(s), inputs as ``launch_forward`` takes them plus its ``output`` and
    ``lse`` and ``grad_output`` (like ``output``): ``grad_query`` (like ``query``) and ``grad_gate``
    are overwritten, ``grad_key``, ``grad_value`` (fp32 [batch, kv_head, seq, d], zero on entry)
    and ``grad_sinks`` (fp32 [q_head], zero on entry) are accumulated into with atomics.
    With ``launch.kv_chunk`` the first kernel makes dq, d gate, d sinks and ``delta``, and
    ``key_value_grad_kernel`` dk and dv; with ``launch.dq_atomics`` too, the first kernel makes
    ``delta`` (and d sinks) only, and the key/value kernel everything else, dq and d gate by fp32
    atomics: dq one GQA group at a time, in place where ``grad_query`` is fp32, else into an fp32
    buffer of [group, seq, d_head] cast into ``grad_query`` after each group; d gate in place where
    ``grad_gate`` is fp32, else into an fp32 copy cast at the end. ``grad_query`` must then be
    contiguous. ``launch`` None: ``backward_launch``'s for the sizes."""
    batch, n_q_heads, seq_len = query.shape[:3]
    if launch is None:
        launch = backward_launch(seq_len, max(query.shape[-1], value.shape[-1]), block_indices.shape[-1])
    grid = query_grid(block_indices.shape[2], batch, n_q_heads, key.shape[1], launch.heads_inner)
    gate_args = (block_gate, grad_gate) if block_gate is not None else (lse, lse)  # unread placeholders
    sink_args = (sinks, grad_sinks) if sinks is not None else (lse, lse)
    launch = launch_for_sizes(launch, query, value, block_indices, query_block, key_block, backward=True)
    config = launch_config(query, value, block_indices, block_gate, query_block, key_block, window, softcap, sinks,
                            scale=scale, launch=launch)
    split = launch.kv_chunk > 0
    fused = split and launch.dq_atomics
    n_kv_rows, group = batch * key.shape[1], n_q_heads // key.shape[1]
    # What the key/value kernel needs is made before any kernel runs: a failure there (out of memory
    # for the slot table or the dq buffer) leaves the accumulated buffers as they were.
    if split:
        entries, items_per_row = _key_block_entries(block_indices, seq_len, query_block, key_block, key.shape[1],
                                                    launch.kv_chunk)
    if fused:
        gate_sums = None if block_gate is None else (grad_gate.zero_() if grad_gate.dtype == torch.float32
                                                     else torch.zeros_like(grad_gate, dtype=torch.float32))
        query_rows = grad_query.view(batch * n_q_heads, seq_len, -1)
        scratch = None if grad_query.dtype == torch.float32 else query_rows.new_empty(
            (group, seq_len, query.shape[-1]), dtype=torch.float32)
    delta: Float[Tensor, "batch q_head seq"] | None = lse.new_empty(lse.shape) if split else None
    backward_kernel[grid](
        query, key, value, block_indices, gate_args[0], sink_args[0], output, grad_output, lse,
        grad_query, grad_key, grad_value, gate_args[1], sink_args[1], delta if split else lse, float(scale),
        *feature_args(window, softcap), *kernel_sizes(query, key, value, block_indices),
        **config, KV_GRADS=not split, QUERY_GRADS=not fused, **launch.kernel_options(),
    )
    if not split:
        return
    unused = ("SLOTS", "HAS_SINKS", "SKIP_UNREACHED", "HEADS_INNER")
    constants = {name: setting for name, setting in config.items() if name not in unused}
    # Without dq_atomics one launch runs every item. With it, dq is summed one GQA group at a time
    # (its query heads read one key head, whose items are contiguous): an fp32 buffer of group x seq
    # x d_head instead of the whole dq's, cast into grad_query after each group.
    groups = range(n_kv_rows) if fused else [None]
    for key_row in groups:  # batch * n_kv_heads + kv head
        if key_row is None:  # every item in one launch; dq and d gate unread
            first_item, n_items, first_sum_row = 0, n_kv_rows * items_per_row, 0
            query_sums, gate_out = grad_query, gate_args[1]
        else:
            rows = query_rows[key_row * group:(key_row + 1) * group]
            query_sums = rows.zero_() if scratch is None else scratch.zero_()
            first_item, n_items, first_sum_row = key_row * items_per_row, items_per_row, key_row * group
            gate_out = gate_sums if gate_sums is not None else lse
        key_value_grad_kernel[(n_items, key_block // config["KEY_TILE"])](
            query, key, value, gate_args[0], grad_output, lse, delta, *entries, grad_key, grad_value,
            query_sums, gate_out, first_item, first_sum_row, float(scale), *feature_args(window, softcap),
            seq_len, num_blocks(seq_len, key_block), *block_indices.shape[2:], query.shape[-1], value.shape[-1],
            **constants, QUERY_GRADS=fused, **launch.kernel_options(),
        )
        if key_row is not None and scratch is not None:
            rows.copy_(scratch)
    if not fused:
        return
    if gate_sums is not None and gate_sums is not grad_gate:
        grad_gate.copy_(gate_sums)
