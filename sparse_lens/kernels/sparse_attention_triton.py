"""Block-sparse attention, Triton kernels (forward and backward) matching ``sparse_attention``.

``block_sparse_attention_triton`` has the signature and semantics of the torch reference
``block_sparse_attention``: each query attends causally to the keys of its query block's kept key
blocks only, softmax renormalised over those keys; it returns ``(output, lse, block_mass)`` and is
differentiable (through ``output``) with respect to query, key, value and ``block_gate``.

Forward (``_forward_kernel``, one launch)
    Grid ``(n_query_blocks, batch * q_head)``: one program per (head, query block), so that the
    program owns everything written for that block and every store is plain (no atomics, the
    result is deterministic). The program walks its query block in query tiles of
    ``min(query_block, 64)`` rows; for each tile one loop runs over the (slot, key tile) pairs of
    the block's row of ``block_indices`` (key tiles of ``min(key_block, 64)`` keys), running the
    flash-attention online softmax (running row max, row sum, fp32 output accumulator) in base 2:
    ``exp(scale * s) = exp2(s * scale * log2 e)``, the factor folded into the exp2's multiply-add,
    ``lse`` converted back at the end. ``_tile_plan`` decides per tile: a tile is *reached* unless
    its slot is unused (-1), it lies wholly after the tile's last query, or wholly older than the
    window; it *needs a mask* where some query does not see some key of it (the diagonal, padding
    rows at the end, the window's edge). ``KernelLaunch`` chooses how (results equal up to fp32
    rounding): ``skip_unreached`` branches around unreached tiles without loading them (the
    branch keeps Triton from pipelining the loop's loads), else the loop is branch-free: an
    unreached tile is read at block 0 and masked whole; ``mask_all`` masks every tile, else only
    those that need it. ``block_mass`` needs the final normaliser, which the online softmax only
    knows at the end; it gets it without a second pass: a [query_tile, top_k] register tensor keeps
    each slot's partial row sums, rescaled with the output accumulator whenever the running max
    moves, so at the end ``slot_sums / row_sum = sum over the slot's keys of exp(s - lse)``
    exactly. The gate multiplies a slot's probabilities before ``P @ V`` only, so lse and
    block_mass stay ungated.

Backward (``_backward_kernel``; with ``KernelLaunch.kv_chunk`` also ``_key_value_grad_kernel``)
    Same grid and loop. With ``p = exp(s - lse)`` recomputed from the saved lse, ``g`` the slot's
    gate and ``delta = rowsum(dO * O)`` (equal to ``sum_j p_j dp_j`` also with gates, since
    ``O = sum_b g_b P_b V_b``): ``dp = g * dO V^T``, ``ds = p * (dp - delta)``, ``dq = scale * ds K``,
    ``dk = scale * ds^T Q``, ``dv = (g p)^T dO`` and ``d gate = sum(p * dO V^T)`` over the slot.
    dq and d gate belong to one program and are stored plainly. A key block is kept by many query
    blocks (and, with GQA, by several query heads), so dk and dv meet from many programs. By
    default (``kv_chunk = 0``) each tile's dk and dv are added with ``tl.atomic_add`` into fp32
    [batch, kv_head, seq, d] buffers (``top_k * key_block * (d + d_value)`` adds per query block).
    With ``kv_chunk = n`` the backward kernel makes dq, d gate and ``delta`` only, and
    ``_key_value_grad_kernel`` makes dk and dv by key tile: ``_key_block_entries`` sorts the slots
    by (kv row, key block) on the device (a stable argsort and a histogram, per call), one program
    per key tile and chunk of at most ``n`` of its block's slots sums their dk, dv in registers and
    adds them once (chunks, because the sink block is kept by every query block). That recomputes
    ``s`` and ``dp`` (7 tile products instead of 5) for far fewer atomics. Either way the buffers
    are cast to the input dtype at the end, and the order of the fp32 sums (hence the last bits
    of dk, dv) varies from run to run.

Optional features (``window``, ``softcap``, ``sinks``; semantics in ``sparse_attention``)
    Each is a constexpr flag (``HAS_WINDOW``, ``HAS_SOFTCAP``, ``HAS_SINKS``), so the default call
    compiles to the same code as without them. ``_scores_log2`` caps the scores
    (``softcap * tanh(s / softcap)``, tanh written with ``exp``) and ``_visible`` adds the window to
    the causal mask; tiles wholly older than the window are unreached. A sink starts each row's
    online softmax as one already-seen element (running max = sink, running sum = 1, no value),
    so ``lse``, the output and ``block_mass`` include it. Backward: ``ds`` is multiplied by the
    cap's derivative ``1 - (capped / softcap)^2``; ``d sink = -sum over queries of exp(sink - lse) *
    delta``, one fp32 atomic add per (head, query block) into a [q_head] buffer.

Memory traffic per (head, query block): the query tile once, each kept key/value tile once
(``top_k * key_block * (d + d_value)`` elements), the output and lse once; the backward adds the
output and its gradient once and the dk/dv atomics (or, split, the key/value kernel's reads of
q, dO, lse and delta per slot). Nothing of size T x T or ``top_k * key_block`` per query is ever
written to global memory; registers hold at most a query tile x key tile of scores. Query blocks
vary fastest in the grid by default, so programs running together belong to one head and share
its sink and local key blocks in L2 (``KernelLaunch.heads_inner``: the query heads of a GQA group
vary fastest, sharing their key head's blocks). Total work is O(T * top_k * key_block * d) per head.

Measured on one H200 (triton 3.6, bf16, Qwen2.5-1.5B heads: 12 query / 2 KV, d = 128, 64-token
blocks, Stream's top 16; ``benchmarks/attention_sweep.py``, TFLOP/s on the kept causal pairs):
forward 2.03 ms at T = 128k, 392 TFLOP/s (the branching launch before: 2.61 ms, 305), 21.4 ms at
1M, 299 (25.8 ms, 248); backward 13.6 ms at 128k, 147 TFLOP/s (15.5 ms, 128), 139 ms at 1M, 115
(156 ms, 103); dense cuDNN SDPA at 128k: 92.6 ms forward, 240 ms backward. At 1M the forward reads
key/value tiles at 4.9 TB/s, HBM's rate: random picks miss L2, and 64x64 tiles give 64 FLOPs per
byte, so it is bandwidth-bound there.

Inputs are made contiguous; fp32, bf16 and fp16 are supported, accumulation is fp32; fp32
products use ``input_precision="ieee"`` (no TF32), bf16/fp16 products run on tensor cores. Under
the Triton interpreter (``TRITON_INTERPRET=1``, the CPU test runs) bf16 products are made in fp32,
because the interpreter's ``tl.dot`` mishandles bf16. Block sizes must be powers of two >= 16
(``tl.dot`` tiles need at least 16 rows and columns). Where the sequence is a whole number of
tiles and the head dims are powers of two (``EVEN``) the tile loads carry no masks.
``launch_forward`` / ``launch_backward`` write into caller-given buffers, with a ``KernelLaunch``:
the tests use them to run the kernels into poisoned outputs, benchmarks/attention_sweep.py to time
the launch variants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import BlockSizeError, ShapeError
from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs, check_block_indices
from sparse_lens.kernels.device_guard import launch_on_tensor_device

MAX_TILE = 64  # rows of a query tile and keys of a key tile, at most
MIN_BLOCK = 16  # smallest tile tl.dot accepts
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = tl.constexpr(1.4426950408889634)  # the kernels run the softmax in base 2: exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # (tl.constexpr: a kernel may read no other global)


@triton.jit
def load_rows(base, rows, n_rows, columns, n_columns):
    """Rows ``rows`` of a row-major [n_rows, n_columns] matrix at ``base``; 0 out of range."""
    in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
    return tl.load(base + rows[:, None] * n_columns + columns[None, :], mask=in_range, other=0.0)


@triton.jit
def _store_rows(base, rows, n_rows, columns, n_columns, values):
    """Write ``values`` to rows ``rows`` of a row-major [n_rows, n_columns] matrix, in range only."""
    in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
    tl.store(base + rows[:, None] * n_columns + columns[None, :], values.to(base.dtype.element_ty), mask=in_range)


@triton.jit
def _add_rows(base, rows, n_rows, columns, n_columns, values):
    """Atomically add ``values`` to rows ``rows`` of a row-major fp32 [n_rows, n_columns] matrix."""
    in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
    tl.atomic_add(base + rows[:, None] * n_columns + columns[None, :], values, mask=in_range, sem="relaxed")


@triton.jit
def kv_row(batch_head, n_q_heads, n_kv_heads):
    """Row ``batch * n_kv_heads + kv_head`` of the key head that query row ``batch_head`` reads (GQA)."""
    batch, q_head = batch_head // n_q_heads, batch_head % n_q_heads
    return batch * n_kv_heads + q_head // (n_q_heads // n_kv_heads)


@triton.jit
def _block_and_head(n_q_heads, n_kv_heads, HEADS_INNER: tl.constexpr):
    """``(query block, batch * n_q_heads + q_head)`` of this program (``query_grid`` lays them out)."""
    if HEADS_INNER:  # the query heads of a GQA group side by side, on one query block
        group = n_q_heads // n_kv_heads
        query_block_id = tl.program_id(0) // group
        batch_head = tl.program_id(1).to(tl.int64) * group + tl.program_id(0) % group
    else:
        query_block_id = tl.program_id(0)
        batch_head = tl.program_id(1).to(tl.int64)  # int64: offsets pass 2**31 on long contexts
    return query_block_id, batch_head


@triton.jit
def _dot(left, right, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fp32 ``left @ right``; ``DOT_UPCAST`` multiplies in fp32 (the interpreter's bf16 workaround)."""
    if DOT_UPCAST:
        product = tl.dot(left.to(tl.float32), right.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(left, right, input_precision=DOT_PRECISION)
    return product


@triton.jit
def masked_scores(query_tile, key_tile, query_pos, key_pos, seq_len, scale,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fp32 ``scale * q . k`` of a [query tile, key tile], -inf where the key is not visible."""
    scores = _dot(query_tile, tl.trans(key_tile), DOT_PRECISION, DOT_UPCAST) * scale
    visible = (key_pos[None, :] <= query_pos[:, None]) & (query_pos[:, None] < seq_len)
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def soft_cap(scores, softcap):
    """``softcap * tanh(scores / softcap)``, tanh as ``1 - 2 / (exp(2x) + 1)`` (exact at +-inf, no NaN)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))


@triton.jit
def _load_tile(base, rows, n_rows, columns, n_columns, EVEN: tl.constexpr, EVICTION: tl.constexpr = ""):
    """``load_rows``, unmasked when ``EVEN`` (every row in range, ``columns`` exactly the width), with
    an L2 ``eviction_policy`` (``""``: the default)."""
    at = base + rows[:, None] * n_columns + columns[None, :]
    if EVEN:
        tile = tl.load(at, eviction_policy=EVICTION)
    else:
        in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
        tile = tl.load(at, mask=in_range, other=0.0, eviction_policy=EVICTION)
    return tile


@triton.jit
def _dot_into(left, right, accumulator, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``accumulator + left @ right`` (fp32), the sum made by the tensor-core instruction itself."""
    if DOT_UPCAST:
        result = tl.dot(left.to(tl.float32), right.to(tl.float32), accumulator, input_precision="ieee")
    else:
        result = tl.dot(left, right, accumulator, input_precision=DOT_PRECISION)
    return result


@triton.jit
def _scores_log2(left_rows, right_rows, scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, FOLD_SCALE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``(scores, factor, capped)`` of ``left_rows @ right_rows^T`` (queries by keys, or keys by
    queries): the base-2 scores are ``scores * factor`` (``factor > 0``).

    ``FOLD_SCALE`` (scale > 0, no soft-cap) leaves ``scale * LOG2E`` in ``factor``, so that the
    caller's ``exp2(scores * factor - max)`` is one fused multiply-add; ``capped`` is the
    soft-capped natural score (for the backward's derivative; 0 without soft-capping).
    """
    scores = _dot(left_rows, tl.trans(right_rows), DOT_PRECISION, DOT_UPCAST)
    capped = 0.0
    factor = 1.0
    if HAS_SOFTCAP:
        capped = soft_cap(scores * scale, softcap)
        scores = capped * LOG2E
    elif FOLD_SCALE:
        factor = scale * LOG2E
    else:
        scores = scores * (scale * LOG2E)
    return scores, factor, capped


@triton.jit
def _visible(key_pos, query_pos, row_limit, window, HAS_WINDOW: tl.constexpr, KEYS_BY_ROWS: tl.constexpr = False):
    """[query tile, key tile] visibility (``KEYS_BY_ROWS``: [key tile, query tile]): ``key <=
    row_limit`` (the query, or -1 for a row that sees nothing), and inside the window if any."""
    if KEYS_BY_ROWS:
        visible = key_pos[:, None] <= row_limit[None, :]
        if HAS_WINDOW:
            visible = visible & (key_pos[:, None] > query_pos[None, :] - window)
    else:
        visible = key_pos[None, :] <= row_limit[:, None]
        if HAS_WINDOW:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
    return visible


@triton.jit
def _tile_plan(key_block_id, first_key, first_query, last_query, seq_len, window,
               QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``(reached, mask_first_key, load_first_key, needs_mask)`` of one key tile of a query tile.

    ``reached``: some key of the tile may be visible (a used slot, not after the tile's last query,
    not wholly older than the window). An unreached tile is read at block 0 (``load_first_key``)
    and masked as keys from ``seq_len`` on (``mask_first_key``), which no query sees.
    ``needs_mask``: some query of the tile does not see some key of it (the diagonal, an unreached
    tile, padding rows, the window's edge); the other tiles skip the mask when ``MASK_ALL`` is off.
    """
    reached = (key_block_id >= 0) & (first_key <= last_query)
    if HAS_WINDOW:
        reached = reached & (first_key + KEY_TILE > first_query - window + 1)
    mask_first_key = tl.where(reached, first_key, seq_len)
    needs_mask = (mask_first_key + KEY_TILE - 1 > first_query) | (last_query < first_query + QUERY_TILE - 1)
    if HAS_WINDOW:
        needs_mask = needs_mask | (first_key <= last_query - window)
    return reached, mask_first_key, tl.where(reached, first_key, 0), needs_mask


@triton.jit
def _forward_step(
    accumulator, row_max, row_sum, slot_sums, query_tile_values, key_base, value_base,
    first_key, load_first_key, needs_mask, row_limit, query_pos, slot, gate, scale, window, softcap, seq_len,
    d_head, d_value, KEY_TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SLOTS: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_MASS: tl.constexpr,
    EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr, KV_EVICTION: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One key tile of the online softmax (base 2): the new ``(accumulator, row_max, row_sum, slot_sums)``.

    Keys are read at ``load_first_key`` and masked as the positions from ``first_key`` (see
    ``_tile_plan``); without ``MASK_ALL`` only where ``needs_mask``.
    """
    tile_rows = tl.arange(0, KEY_TILE)
    keys = _load_tile(key_base, load_first_key + tile_rows, seq_len, tl.arange(0, BLOCK_D), d_head, EVEN, KV_EVICTION)
    values = _load_tile(value_base, load_first_key + tile_rows, seq_len, tl.arange(0, BLOCK_DV), d_value, EVEN,
                        KV_EVICTION)
    scores, factor, _ = _scores_log2(query_tile_values, keys, scale, softcap, HAS_SOFTCAP, FOLD_SCALE,
                                     DOT_PRECISION, DOT_UPCAST)
    key_pos = first_key + tile_rows
    if MASK_ALL:
        scores = tl.where(_visible(key_pos, query_pos, row_limit, window, HAS_WINDOW), scores, float("-inf"))
    elif needs_mask:
        scores = tl.where(_visible(key_pos, query_pos, row_limit, window, HAS_WINDOW), scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1) * factor)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows seeing nothing yet
    rescale = tl.exp2(row_max - shift)
    probs = tl.exp2(scores * factor - shift[:, None])
    tile_sum = tl.sum(probs, axis=1)
    row_sum = row_sum * rescale + tile_sum
    if WITH_MASS:
        slot_ids = tl.arange(0, SLOTS)
        slot_sums = slot_sums * rescale[:, None] + tl.where(slot_ids[None, :] == slot, tile_sum[:, None], 0.0)
    if HAS_GATE:
        probs = probs * gate
    accumulator = _dot_into(probs.to(values.dtype), values, accumulator * rescale[:, None], DOT_PRECISION, DOT_UPCAST)
    return accumulator, new_max, row_sum, slot_sums


@triton.jit
def _forward_kernel(
    query_ptr, key_ptr, value_ptr, block_indices_ptr, block_gate_ptr, sinks_ptr,
    output_ptr, lse_ptr, block_mass_ptr,
    scale, window, softcap, seq_len, n_q_heads, n_kv_heads, n_query_blocks, top_k, d_head, d_value,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SLOTS: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr,
    SKIP_UNREACHED: tl.constexpr, MASK_ALL: tl.constexpr, HEADS_INNER: tl.constexpr,
    KV_EVICTION: tl.constexpr, ONCE_EVICTION: tl.constexpr, WITH_MASS: tl.constexpr = True,
):
    query_block_id, batch_head = _block_and_head(n_q_heads, n_kv_heads, HEADS_INNER)
    kv_batch_head = kv_row(batch_head, n_q_heads, n_kv_heads)
    query_base = query_ptr + batch_head * seq_len * d_head
    key_base = key_ptr + kv_batch_head * seq_len * d_head
    value_base = value_ptr + kv_batch_head * seq_len * d_value
    slots_row = (batch_head * n_query_blocks + query_block_id) * top_k
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    slot_ids = tl.arange(0, SLOTS)
    mass_sum = tl.zeros([SLOTS], dtype=tl.float32)
    TILES: tl.constexpr = KEY_BLOCK // KEY_TILE
    for query_tile in range(QUERY_BLOCK // QUERY_TILE):
        first_query = query_block_id * QUERY_BLOCK + query_tile * QUERY_TILE
        query_pos = first_query + tl.arange(0, QUERY_TILE)
        last_query = tl.minimum(first_query + QUERY_TILE, seq_len) - 1
        row_limit = tl.where(query_pos < seq_len, query_pos, -1)  # padding rows see nothing
        query_tile_values = _load_tile(query_base, query_pos, seq_len, dims, d_head, EVEN, ONCE_EVICTION)
        if HAS_SINKS:  # the sink is an element already seen: running max = sink, running sum = 1
            sink = tl.load(sinks_ptr + batch_head % n_q_heads).to(tl.float32)
            row_max = tl.zeros([QUERY_TILE], dtype=tl.float32) + sink * LOG2E
            row_sum = tl.full([QUERY_TILE], 1.0, dtype=tl.float32)
        else:
            row_max = tl.full([QUERY_TILE], float("-inf"), dtype=tl.float32)
            row_sum = tl.zeros([QUERY_TILE], dtype=tl.float32)
        slot_sums = tl.zeros([QUERY_TILE, SLOTS], dtype=tl.float32)
        accumulator = tl.zeros([QUERY_TILE, BLOCK_DV], dtype=tl.float32)
        for step in tl.range(0, top_k * TILES):  # (slot, key tile) pairs, key tiles fastest
            slot = step // TILES
            key_block_id = tl.load(block_indices_ptr + slots_row + slot)
            gate = tl.load(block_gate_ptr + slots_row + slot).to(tl.float32) if HAS_GATE else 1.0
            first_key = key_block_id * KEY_BLOCK + (step % TILES) * KEY_TILE
            reached, mask_first_key, load_first_key, needs_mask = _tile_plan(
                key_block_id, first_key, first_query, last_query, seq_len, window, QUERY_TILE, KEY_TILE, HAS_WINDOW)
            if SKIP_UNREACHED:  # branch around unreached tiles (no load, no product)
                if reached:
                    accumulator, row_max, row_sum, slot_sums = _forward_step(
                        accumulator, row_max, row_sum, slot_sums, query_tile_values, key_base, value_base,
                        mask_first_key, load_first_key, needs_mask, row_limit, query_pos, slot, gate, scale, window,
                        softcap, seq_len, d_head, d_value, KEY_TILE, BLOCK_D, BLOCK_DV, SLOTS, HAS_GATE, HAS_WINDOW,
                        HAS_SOFTCAP, WITH_MASS, EVEN, FOLD_SCALE, MASK_ALL, KV_EVICTION, DOT_PRECISION, DOT_UPCAST)
            else:  # branch-free, so that Triton can pipeline the loads
                accumulator, row_max, row_sum, slot_sums = _forward_step(
                    accumulator, row_max, row_sum, slot_sums, query_tile_values, key_base, value_base,
                    mask_first_key, load_first_key, needs_mask, row_limit, query_pos, slot, gate, scale, window,
                    softcap, seq_len, d_head, d_value, KEY_TILE, BLOCK_D, BLOCK_DV, SLOTS, HAS_GATE, HAS_WINDOW,
                    HAS_SOFTCAP, WITH_MASS, EVEN, FOLD_SCALE, MASK_ALL, KV_EVICTION, DOT_PRECISION, DOT_UPCAST)
        seen = row_sum > 0.0
        inverse_sum = tl.where(seen, 1.0 / tl.where(seen, row_sum, 1.0), 0.0)
        real = query_pos < seq_len
        output_base = output_ptr + batch_head * seq_len * d_value
        _store_rows(output_base, query_pos, seq_len, value_dims, d_value, accumulator * inverse_sum[:, None])
        lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("-inf"))
        tl.store(lse_ptr + batch_head * seq_len + query_pos, lse, mask=real)
        if WITH_MASS:
            mass_sum += tl.sum(tl.where(real[:, None], slot_sums * inverse_sum[:, None], 0.0), axis=0)
    if WITH_MASS:
        n_real = tl.minimum(seq_len - query_block_id * QUERY_BLOCK, QUERY_BLOCK)
        tl.store(block_mass_ptr + slots_row + slot_ids, mass_sum / n_real, mask=slot_ids < top_k)


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
        scores, factor, capped = _scores_log2(keys, queries, scale, softcap, HAS_SOFTCAP, FOLD_SCALE,
                                              DOT_PRECISION, DOT_UPCAST)
        probs = tl.exp2(scores * factor - lse_log2[None, :])
        grad_probs = _dot(values, tl.trans(grad_out), DOT_PRECISION, DOT_UPCAST)
        centred = gate * grad_probs - delta[None, :]
    else:
        scores, factor, capped = _scores_log2(queries, keys, scale, softcap, HAS_SOFTCAP, FOLD_SCALE,
                                              DOT_PRECISION, DOT_UPCAST)
        probs = tl.exp2(scores * factor - lse_log2[:, None])
        grad_probs = _dot(grad_out, tl.trans(values), DOT_PRECISION, DOT_UPCAST)
        centred = gate * grad_probs - delta[:, None]
    if MASK_ALL:
        probs = tl.where(_visible(key_pos, query_pos, row_limit, window, HAS_WINDOW, KEYS_BY_ROWS), probs, 0.0)
    elif needs_mask:
        probs = tl.where(_visible(key_pos, query_pos, row_limit, window, HAS_WINDOW, KEYS_BY_ROWS), probs, 0.0)
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
    keys = _load_tile(key_ptr + key_offset, load_pos, seq_len, dims, d_head, EVEN, KV_EVICTION)
    values = _load_tile(value_ptr + value_offset, load_pos, seq_len, value_dims, d_value, EVEN, KV_EVICTION)
    probs, grad_probs, grad_scores = _tile_gradients(
        queries, grad_out, keys, values, delta, lse_log2, first_key + tile_rows, needs_mask, row_limit, query_pos,
        gate, scale, window, softcap, HAS_WINDOW, HAS_SOFTCAP, FOLD_SCALE, MASK_ALL, DOT_PRECISION, DOT_UPCAST)
    if HAS_GATE:
        slot_grad = tl.sum(tl.sum(probs * grad_probs, axis=1), axis=0)
        gate_grad += tl.where(tl.arange(0, SLOTS) == slot, slot_grad, 0.0)
    grad_query = _dot_into(grad_scores.to(keys.dtype), keys, grad_query, DOT_PRECISION, DOT_UPCAST)
    if KV_GRADS:
        grad_key = _dot(tl.trans(grad_scores).to(queries.dtype), queries, DOT_PRECISION, DOT_UPCAST)
        grad_value = _dot(tl.trans(probs * gate).to(grad_out.dtype), grad_out, DOT_PRECISION, DOT_UPCAST)
        rows_to_add = tl.where(reached, load_pos, seq_len)  # none of an invisible tile
        _add_rows(grad_key_ptr + key_offset, rows_to_add, seq_len, dims, d_head, grad_key * scale)
        _add_rows(grad_value_ptr + value_offset, rows_to_add, seq_len, value_dims, d_value, grad_value)
    return grad_query, gate_grad


@triton.jit
def _backward_kernel(
    query_ptr, key_ptr, value_ptr, block_indices_ptr, block_gate_ptr, sinks_ptr, output_ptr, grad_output_ptr,
    lse_ptr, grad_query_ptr, grad_key_ptr, grad_value_ptr, grad_gate_ptr, grad_sinks_ptr, delta_ptr,
    scale, window, softcap, seq_len, n_q_heads, n_kv_heads, n_query_blocks, top_k, d_head, d_value,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SLOTS: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr,
    SKIP_UNREACHED: tl.constexpr, MASK_ALL: tl.constexpr, HEADS_INNER: tl.constexpr, KV_GRADS: tl.constexpr,
    KV_EVICTION: tl.constexpr, ONCE_EVICTION: tl.constexpr,
):
    query_block_id, batch_head = _block_and_head(n_q_heads, n_kv_heads, HEADS_INNER)
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
        queries = _load_tile(query_ptr + query_offset, query_pos, seq_len, dims, d_head, EVEN, ONCE_EVICTION)
        grad_out = _load_tile(grad_output_ptr + output_offset, query_pos, seq_len, value_dims, d_value, EVEN,
                              ONCE_EVICTION)
        output = _load_tile(output_ptr + output_offset, query_pos, seq_len, value_dims, d_value, EVEN, ONCE_EVICTION)
        delta = tl.sum(grad_out.to(tl.float32) * output.to(tl.float32), axis=1)
        if not KV_GRADS:  # the key/value gradient kernel reads it
            tl.store(delta_ptr + batch_head * seq_len + query_pos, delta, mask=real)
        lse = tl.load(lse_ptr + batch_head * seq_len + query_pos, mask=real, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # such rows see no key: every p is 0 anyway
        if HAS_SINKS:  # d sink = -sum_t exp(sink - lse_t) * delta_t
            sink = tl.load(sinks_ptr + batch_head % n_q_heads).to(tl.float32)
            sink_grad = -tl.sum(tl.where(real, tl.exp(sink - lse) * delta, 0.0), axis=0)
            tl.atomic_add(grad_sinks_ptr + batch_head % n_q_heads, sink_grad, sem="relaxed")
        lse_log2 = lse * LOG2E
        grad_query = tl.zeros([QUERY_TILE, BLOCK_D], dtype=tl.float32)
        for step in tl.range(0, top_k * TILES):
            slot = step // TILES
            key_block_id = tl.load(block_indices_ptr + slots_row + slot)
            gate = tl.load(block_gate_ptr + slots_row + slot).to(tl.float32) if HAS_GATE else 1.0
            first_key = key_block_id * KEY_BLOCK + (step % TILES) * KEY_TILE
            reached, mask_first_key, load_first_key, needs_mask = _tile_plan(
                key_block_id, first_key, first_query, last_query, seq_len, window, QUERY_TILE, KEY_TILE, HAS_WINDOW)
            if SKIP_UNREACHED:
                if reached:
                    grad_query, gate_grad = _backward_step(
                        grad_query, gate_grad, queries, grad_out, delta, lse_log2, key_ptr, value_ptr, grad_key_ptr,
                        grad_value_ptr, key_offset, value_offset, mask_first_key, load_first_key, reached, needs_mask,
                        row_limit, query_pos, slot, gate, scale, window, softcap, seq_len, d_head, d_value, KEY_TILE,
                        BLOCK_D, BLOCK_DV, SLOTS, HAS_GATE, HAS_WINDOW, HAS_SOFTCAP, EVEN, FOLD_SCALE, MASK_ALL,
                        KV_GRADS, KV_EVICTION, DOT_PRECISION, DOT_UPCAST)
            else:
                grad_query, gate_grad = _backward_step(
                    grad_query, gate_grad, queries, grad_out, delta, lse_log2, key_ptr, value_ptr, grad_key_ptr,
                    grad_value_ptr, key_offset, value_offset, mask_first_key, load_first_key, reached, needs_mask,
                    row_limit, query_pos, slot, gate, scale, window, softcap, seq_len, d_head, d_value, KEY_TILE,
                    BLOCK_D, BLOCK_DV, SLOTS, HAS_GATE, HAS_WINDOW, HAS_SOFTCAP, EVEN, FOLD_SCALE, MASK_ALL,
                    KV_GRADS, KV_EVICTION, DOT_PRECISION, DOT_UPCAST)
        _store_rows(grad_query_ptr + query_offset, query_pos, seq_len, dims, d_head, grad_query * scale)
    if HAS_GATE:
        grad_gate_at = grad_gate_ptr + slots_row + slot_ids
        tl.store(grad_gate_at, gate_grad.to(grad_gate_ptr.dtype.element_ty), mask=slot_ids < top_k)


@triton.jit
def _key_value_grad_kernel(
    query_ptr, key_ptr, value_ptr, block_gate_ptr, grad_output_ptr, lse_ptr, delta_ptr,
    entry_slots_ptr, item_owners_ptr, item_starts_ptr, item_ends_ptr, grad_key_ptr, grad_value_ptr,
    scale, window, softcap, seq_len, n_key_blocks, n_query_blocks, top_k, d_head, d_value,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr,
    KV_EVICTION: tl.constexpr, ONCE_EVICTION: tl.constexpr,
):
    """dk and dv of one key tile over a chunk of the (query head, query block) slots that keep its
    block (``_key_block_entries``), summed in registers and added once (fp32 atomics: a block's
    chunks meet there)."""
    item = tl.program_id(0)
    owner = tl.load(item_owners_ptr + item).to(tl.int64)  # kv row * n_key_blocks + key block
    kv_batch_head, key_block_id = owner // n_key_blocks, owner % n_key_blocks
    first_key = key_block_id * KEY_BLOCK + tl.program_id(1) * KEY_TILE
    key_pos = first_key + tl.arange(0, KEY_TILE)
    dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    key_offset, value_offset = kv_batch_head * seq_len * d_head, kv_batch_head * seq_len * d_value
    # Here k and v are read once per program, q and dO by many programs (the L2 hints swap roles).
    keys = _load_tile(key_ptr + key_offset, key_pos, seq_len, dims, d_head, EVEN, ONCE_EVICTION)
    values = _load_tile(value_ptr + value_offset, key_pos, seq_len, value_dims, d_value, EVEN, ONCE_EVICTION)
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
            reached, mask_first_key, _, needs_mask = _tile_plan(
                key_block_id, first_key, first_query, last_query, seq_len, window, QUERY_TILE, KEY_TILE, HAS_WINDOW)
            query_offset, output_offset = batch_head * seq_len * d_head, batch_head * seq_len * d_value
            queries = _load_tile(query_ptr + query_offset, query_pos, seq_len, dims, d_head, EVEN, KV_EVICTION)
            grad_out = _load_tile(grad_output_ptr + output_offset, query_pos, seq_len, value_dims, d_value, EVEN,
                                  KV_EVICTION)
            lse = tl.load(lse_ptr + batch_head * seq_len + query_pos, mask=real, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(delta_ptr + batch_head * seq_len + query_pos, mask=real, other=0.0)
            probs_t, _, grad_scores_t = _tile_gradients(  # [key tile, query tile]
                queries, grad_out, keys, values, delta, lse * LOG2E, mask_first_key + tl.arange(0, KEY_TILE),
                needs_mask, tl.where(real, query_pos, -1), query_pos, gate, scale, window, softcap,
                HAS_WINDOW, HAS_SOFTCAP, FOLD_SCALE, MASK_ALL, DOT_PRECISION, DOT_UPCAST, KEYS_BY_ROWS=True)
            grad_key = _dot_into(grad_scores_t.to(queries.dtype), queries, grad_key, DOT_PRECISION, DOT_UPCAST)
            grad_value = _dot_into((probs_t * gate).to(grad_out.dtype), grad_out, grad_value,
                                   DOT_PRECISION, DOT_UPCAST)
    _add_rows(grad_key_ptr + key_offset, key_pos, seq_len, dims, d_head, grad_key * scale)
    _add_rows(grad_value_ptr + value_offset, key_pos, seq_len, value_dims, d_value, grad_value)


def _key_block_entries(block_indices: Tensor, seq_len: int, query_block: int, key_block: int, n_kv_heads: int,
                       chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The slots of ``block_indices`` grouped by the key block they keep, for ``_key_value_grad_kernel``.

    Returns ``(entry_slots, item_owners, item_starts, item_ends)``: ``entry_slots`` [n_entries] are
    flat indices into ``block_indices`` of the used, causally reachable slots, sorted by owner
    ``kv row * n_key_blocks + key block`` (kv row = batch * n_kv_heads + kv head: the query heads
    of a GQA group meet there); item ``i`` (one program) is the entries
    ``[item_starts[i], item_ends[i])`` of owner ``item_owners[i]``, at most ``chunk`` of them (the
    sink block is kept by every query block: unchunked, its program would run alone for long).
    """
    batch, n_q_heads, n_query_blocks, top_k = block_indices.shape
    device = block_indices.device
    n_key_blocks = num_blocks(seq_len, key_block)
    flat = block_indices.reshape(-1).long()
    slot_at = torch.arange(flat.numel(), device=device)
    query_row, query_block_id = slot_at // (n_query_blocks * top_k), (slot_at // top_k) % n_query_blocks
    last_query = torch.clamp((query_block_id + 1) * query_block, max=seq_len) - 1
    kept = (flat >= 0) & (flat * key_block <= last_query)
    kv_row = (query_row // n_q_heads) * n_kv_heads + (query_row % n_q_heads) // (n_q_heads // n_kv_heads)
    owners = (kv_row * n_key_blocks + flat)[kept]
    order = torch.argsort(owners, stable=True)
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    entry_slots = slot_at[kept][order].to(index_dtype)
    counts = torch.bincount(owners, minlength=batch * n_kv_heads * n_key_blocks)
    firsts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    item_owners = torch.repeat_interleave(torch.arange(counts.numel(), device=device), n_chunks)
    chunk_of_item = torch.arange(item_owners.numel(), device=device) - torch.repeat_interleave(
        torch.cumsum(n_chunks, 0) - n_chunks, n_chunks)
    item_starts = firsts[item_owners] + chunk_of_item * chunk
    item_ends = torch.minimum(item_starts + chunk, firsts[item_owners] + counts[item_owners])
    return entry_slots, item_owners.to(index_dtype), item_starts.to(index_dtype), item_ends.to(index_dtype)


def check_triton_block_sizes(query_block: int, key_block: int) -> None:
    """Raise ``BlockSizeError`` unless both block sizes are powers of two of at least 16."""
    for name, block in (("query_block", query_block), ("key_block", key_block)):
        if not isinstance(block, int) or block < MIN_BLOCK or block & (block - 1):
            raise BlockSizeError(
                f"The Triton block-sparse attention needs {name} to be a power of two >= {MIN_BLOCK} "
                f"(tl.dot tiles), got {block!r}; use the torch reference block_sparse_attention for other sizes."
            )


@dataclass(frozen=True)
class KernelLaunch:
    """How a kernel is launched; every setting leaves the results unchanged (up to fp32 rounding).

    ``num_warps``, ``num_stages``: Triton's (``num_stages``: depth of the software pipeline of the
    key-tile loop's loads). ``skip_unreached``: branch around key tiles that are wholly invisible
    (an unused slot, a block after the query tile, one older than the window), which saves their
    work but keeps Triton from pipelining the loop's loads; without it the loop is branch-free and
    such tiles are read at block 0 and masked. ``mask_all``: apply the causal / window mask to
    every tile; off, only to tiles that need it (a branch per tile; the others are whole).
    ``query_tile`` / ``key_tile``: rows of a query tile and keys of a key tile, at most (capped by
    the block sizes; powers of two >= 16).
    ``kv_chunk`` (backward only): 0 adds each tile's dk / dv to global memory with atomics inside
    the one backward kernel; ``n > 0`` makes dk / dv in a second kernel, one program per key tile
    and chunk of at most ``n`` (query head, query block) slots that keep its block, summed in
    registers (one atomic add per chunk). ``heads_inner``: the grid runs the query heads of a GQA
    group side by side on each query block (so that programs running together read one key head's
    blocks: its local and shared picks hit L2); else query blocks vary fastest, within one head.
    ``l2_hints``: tiles read by many programs (k, v; q, dO in the key/value kernel) are loaded with
    ``eviction_policy="evict_last"``, those read once with ``"evict_first"``, to keep the former in L2.
    """

    num_warps: int = 4
    num_stages: int = 3
    skip_unreached: bool = True
    mask_all: bool = True
    query_tile: int = MAX_TILE
    key_tile: int = MAX_TILE
    kv_chunk: int = 0
    heads_inner: bool = False
    l2_hints: bool = False

    def kernel_options(self) -> dict:
        """``num_warps`` / ``num_stages`` keyword arguments of a Triton launch."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


# The defaults, the fastest of the first H200 sweep at 64x64 blocks (benchmarks/results/h200x2_2026-11-30c/
# attention_sweep.json; the previous default was KernelLaunch(): 4 warps, branching, every tile masked).
FORWARD_LAUNCH = KernelLaunch(skip_unreached=False, mask_all=False)
BACKWARD_LAUNCH = KernelLaunch(num_warps=8, skip_unreached=False, mask_all=False, heads_inner=True)
WIDE_ROWS = 64  # slots per row above which the kernels always branch around unreached tiles


def query_grid(n_query_blocks: int, batch: int, n_q_heads: int, n_kv_heads: int, launch: KernelLaunch) -> tuple:
    """The grid of the per-query-block kernels: one program per (query block, batch, query head)."""
    if launch.heads_inner:
        return (n_query_blocks * (n_q_heads // n_kv_heads), batch * n_kv_heads)
    return (n_query_blocks, batch * n_q_heads)


def launch_for_rows(launch: KernelLaunch, top_k: int) -> KernelLaunch:
    """``launch``, but branching around unreached tiles on rows of more than ``WIDE_ROWS`` slots:
    a dense band's rows (``dense_sdpa.dense_attention_band``) are mostly unused slots in its early
    query blocks, where the branch-free loop would read and mask them all."""
    return replace(launch, skip_unreached=True) if top_k > WIDE_ROWS else launch


def _launch_config(query: Tensor, value: Tensor, block_indices: Tensor, block_gate: Tensor | None,
                   query_block: int, key_block: int, window: int | None = None, softcap: float | None = None,
                   sinks: Tensor | None = None, *, scale: float = 1.0, launch: KernelLaunch = FORWARD_LAUNCH) -> dict:
    """Compile-time constants of both kernels."""
    query_tile, key_tile = min(query_block, launch.query_tile), min(key_block, launch.key_tile)
    block_d = max(MIN_BLOCK, triton.next_power_of_2(query.shape[-1]))
    block_dv = max(MIN_BLOCK, triton.next_power_of_2(value.shape[-1]))
    seq_len = query.shape[2]
    return dict(
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None,
        QUERY_BLOCK=query_block, KEY_BLOCK=key_block, QUERY_TILE=query_tile, KEY_TILE=key_tile,
        BLOCK_D=block_d, BLOCK_DV=block_dv,
        SLOTS=max(2, triton.next_power_of_2(block_indices.shape[-1])),
        HAS_GATE=block_gate is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        # The Triton interpreter multiplies bf16 tl.dot operands as raw uint16 bits
        # (triton-lang/triton#11584): there, bf16 operands are multiplied in fp32 instead.
        DOT_UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        # Tiles wholly in range (no row or column masks on the loads):
        EVEN=seq_len % query_tile == 0 and seq_len % key_tile == 0
        and block_d == query.shape[-1] and block_dv == value.shape[-1],
        FOLD_SCALE=scale > 0,  # the scale rides in the exp2's multiply-add (the row max needs scale > 0)
        SKIP_UNREACHED=launch.skip_unreached, MASK_ALL=launch.mask_all, HEADS_INNER=launch.heads_inner,
        KV_EVICTION="evict_last" if launch.l2_hints else "", ONCE_EVICTION="evict_first" if launch.l2_hints else "",
    )


def _sizes(query: Tensor, key: Tensor, value: Tensor, block_indices: Tensor) -> tuple:
    """Runtime integer arguments shared by both kernels, after the pointers and ``scale``."""
    batch, n_q_heads, seq_len, d_head = query.shape
    n_query_blocks, top_k = block_indices.shape[2:]
    return seq_len, n_q_heads, key.shape[1], n_query_blocks, top_k, d_head, value.shape[-1]


def _feature_args(window: int | None, softcap: float | None) -> tuple[int, float]:
    """Runtime ``window, softcap`` kernel arguments (unread placeholders when the feature is off)."""
    return (0 if window is None else int(window)), (1.0 if softcap is None else float(softcap))


@launch_on_tensor_device
def launch_forward(query, key, value, block_indices, block_gate, output, lse, block_mass, *,
                   query_block: int, key_block: int, scale: float, window: int | None = None,
                   softcap: float | None = None, sinks: Tensor | None = None, with_mass: bool = True,
                   launch: KernelLaunch = FORWARD_LAUNCH) -> None:
    """Run the forward kernel into caller-given buffers (every element of them is written).

    ``query`` [batch, q_head, seq, d_head], ``key`` / ``value`` [batch, kv_head, seq, d_head /
    d_value], ``block_indices`` int32 [batch, q_head, n_query_blocks, top_k], ``block_gate`` None
    or like it; written: ``output`` [batch, q_head, seq, d_value] (the inputs' dtype), ``lse``
    fp32 [batch, q_head, seq], ``block_mass`` fp32 like ``block_indices``. All contiguous, on one
    device, unchecked (``block_sparse_attention_triton`` checks); ``sinks`` float32. The tests call
    it with poisoned buffers. ``with_mass=False`` leaves ``block_mass`` unwritten and keeps no
    per-slot sums (for wide rows, e.g. a dense band of thousands of blocks, whose [query tile,
    slots] register tensor would spill). ``launch``: the launch settings
    (benchmarks/attention_sweep.py times them).
    """
    batch, n_q_heads = query.shape[:2]
    grid = query_grid(block_indices.shape[2], batch, n_q_heads, key.shape[1], launch)
    launch = launch_for_rows(launch, block_indices.shape[-1])
    config = _launch_config(query, value, block_indices, block_gate, query_block, key_block, window, softcap, sinks,
                            scale=scale, launch=launch)
    if not with_mass:
        config |= dict(WITH_MASS=False, SLOTS=2)
    _forward_kernel[grid](
        query, key, value, block_indices, block_gate if block_gate is not None else block_mass,
        sinks if sinks is not None else lse,  # unread placeholder without sinks
        output, lse, block_mass, float(scale), *_feature_args(window, softcap),
        *_sizes(query, key, value, block_indices),
        **config, **launch.kernel_options(),
    )


@launch_on_tensor_device
def launch_backward(query, key, value, block_indices, block_gate, output, grad_output, lse,
                    grad_query, grad_key, grad_value, grad_gate, *, query_block: int, key_block: int,
                    scale: float, window: int | None = None, softcap: float | None = None,
                    sinks: Tensor | None = None, grad_sinks: Tensor | None = None,
                    launch: KernelLaunch = BACKWARD_LAUNCH) -> None:
    """Run the backward kernel(s), inputs as ``launch_forward`` takes them plus its ``output`` and
    ``lse`` and ``grad_output`` (like ``output``): ``grad_query`` (like ``query``) and ``grad_gate``
    are overwritten, ``grad_key``, ``grad_value`` (fp32 [batch, kv_head, seq, d], zero on entry)
    and ``grad_sinks`` (fp32 [q_head], zero on entry) are accumulated into with atomics.
    With ``launch.kv_chunk`` the first kernel makes dq (and ``delta``) only, and
    ``_key_value_grad_kernel`` dk and dv."""
    batch, n_q_heads, seq_len = query.shape[:3]
    grid = query_grid(block_indices.shape[2], batch, n_q_heads, key.shape[1], launch)
    gate_args = (block_gate, grad_gate) if block_gate is not None else (lse, lse)  # unread placeholders
    sink_args = (sinks, grad_sinks) if sinks is not None else (lse, lse)
    launch = launch_for_rows(launch, block_indices.shape[-1])
    config = _launch_config(query, value, block_indices, block_gate, query_block, key_block, window, softcap, sinks,
                            scale=scale, launch=launch)
    split = launch.kv_chunk > 0
    delta: Float[Tensor, "batch q_head seq"] | None = lse.new_empty(lse.shape) if split else None
    _backward_kernel[grid](
        query, key, value, block_indices, gate_args[0], sink_args[0], output, grad_output, lse,
        grad_query, grad_key, grad_value, gate_args[1], sink_args[1], delta if split else lse, float(scale),
        *_feature_args(window, softcap), *_sizes(query, key, value, block_indices),
        **config, KV_GRADS=not split, **launch.kernel_options(),
    )
    if not split:
        return
    entries = _key_block_entries(block_indices, seq_len, query_block, key_block, key.shape[1], launch.kv_chunk)
    if entries[1].numel() == 0:
        return
    unused = ("SLOTS", "HAS_SINKS", "SKIP_UNREACHED", "HEADS_INNER")
    _key_value_grad_kernel[(entries[1].numel(), key_block // config["KEY_TILE"])](
        query, key, value, gate_args[0], grad_output, lse, delta, *entries, grad_key, grad_value,
        float(scale), *_feature_args(window, softcap), seq_len, num_blocks(seq_len, key_block),
        *block_indices.shape[2:], query.shape[-1], value.shape[-1],
        **{name: setting for name, setting in config.items() if name not in unused}, **launch.kernel_options(),
    )


# The autograd function runs the kernels through these names (tests/tl/test_checkpointing.py replaces them).
_launch_forward, _launch_backward = launch_forward, launch_backward


class _BlockSparseAttention(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward; lse and block_mass are not differentiable."""

    @staticmethod
    def forward(ctx, query, key, value, block_gate, sinks, block_indices, query_block, key_block, scale, window,
                softcap, with_mass):
        batch, n_q_heads, seq_len, _ = query.shape
        output: Float[Tensor, "batch q_head seq d_value"] = query.new_empty(
            (batch, n_q_heads, seq_len, value.shape[-1])
        )
        lse: Float[Tensor, "batch q_head seq"] = query.new_empty((batch, n_q_heads, seq_len), dtype=torch.float32)
        block_mass: Float[Tensor, "batch q_head n_query_blocks top_k"] = query.new_empty(
            block_indices.shape if with_mass else (0,), dtype=torch.float32
        )
        _launch_forward(query, key, value, block_indices, block_gate, output, lse, block_mass,
                        query_block=query_block, key_block=key_block, scale=scale, window=window,
                        softcap=softcap, sinks=sinks, with_mass=with_mass)
        ctx.save_for_backward(query, key, value, block_gate, sinks, block_indices, output, lse)
        ctx.blocks = (query_block, key_block, scale, window, softcap)
        ctx.mark_non_differentiable(lse, block_mass)
        return output, lse, block_mass

    @staticmethod
    def backward(ctx, grad_output, _grad_lse, _grad_block_mass):
        query, key, value, block_gate, sinks, block_indices, output, lse = ctx.saved_tensors
        query_block, key_block, scale, window, softcap = ctx.blocks
        grad_query: Float[Tensor, "batch q_head seq d_head"] = torch.empty_like(query)
        grad_key: Float[Tensor, "batch kv_head seq d_head"] = torch.zeros_like(key, dtype=torch.float32)
        grad_value: Float[Tensor, "batch kv_head seq d_value"] = torch.zeros_like(value, dtype=torch.float32)
        grad_gate = None if block_gate is None else torch.empty_like(block_gate)
        grad_sinks = None if sinks is None else torch.zeros_like(sinks, dtype=torch.float32)
        _launch_backward(query, key, value, block_indices, block_gate, output, grad_output.contiguous(), lse,
                         grad_query, grad_key, grad_value, grad_gate,
                         query_block=query_block, key_block=key_block, scale=scale, window=window,
                         softcap=softcap, sinks=sinks, grad_sinks=grad_sinks)
        return (grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), grad_gate, grad_sinks,
                None, None, None, None, None, None, None)


def block_sparse_attention_triton(
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
    with_block_mass: bool = True,
) -> tuple[
    Float[Tensor, "batch q_head seq d_value"],
    Float[Tensor, "batch q_head seq"],
    Float[Tensor, "batch q_head n_query_blocks top_k"] | None,
]:
    """Attention restricted to the kept key blocks: ``(output, lse, block_mass)``, on Triton.

    ``with_block_mass=False`` returns ``block_mass=None`` and skips its per-slot sums: for rows of
    very many slots (``dense_sdpa.dense_attention_band``), where they would spill registers.

    Same contract as ``sparse_attention.block_sparse_attention`` (with ``window``,
    ``softcap`` and ``sinks``); differentiable w.r.t. query, key, value, ``block_gate`` and
    ``sinks`` (the sink gradient is returned in float32, cast to the sinks' dtype) through
    ``output``. Block sizes: powers of two >= 16.
    """
    check_attention_inputs(query, key, value)
    check_attention_features(window, softcap, sinks, query.shape[1])
    check_triton_block_sizes(query_block, key_block)
    check_block_indices(block_indices, query, num_blocks(query.shape[2], query_block))
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(
            f"query, key and value must share one dtype of {SUPPORTED_DTYPES}, "
            f"got {query.dtype}, {key.dtype}, {value.dtype}."
        )
    if block_gate is not None and block_gate.shape != block_indices.shape:
        raise ShapeError(f"block_gate {tuple(block_gate.shape)} must match block_indices {tuple(block_indices.shape)}.")
    if block_gate is not None:
        block_gate = block_gate.contiguous()
    if sinks is not None:
        sinks = sinks.to(device=query.device, dtype=torch.float32).contiguous()
    output, lse, block_mass = _BlockSparseAttention.apply(
        query.contiguous(), key.contiguous(), value.contiguous(), block_gate, sinks,
        block_indices.to(torch.int32).contiguous(), query_block, key_block, scale, window, softcap, with_block_mass,
    )
    return (output, lse, block_mass) if with_block_mass else (output, lse, None)
