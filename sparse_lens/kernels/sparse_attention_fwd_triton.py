"""Block-sparse attention forward, Triton: ``forward_kernel`` and its launch ``launch_forward``.

Grid ``(n_query_blocks, batch * q_head)``: one program per (head, query block), so that the
program owns everything written for that block and every store is plain (no atomics, the
result is deterministic). The program walks its query block in query tiles of
``min(query_block, 64)`` rows; for each tile one loop runs over the (slot, key tile) pairs of
the block's row of ``block_indices`` (key tiles of ``min(key_block, 64)`` keys), running the
flash-attention online softmax (running row max, row sum, fp32 output accumulator) in base 2:
``exp(scale * s) = exp2(s * scale * log2 e)``, the factor folded into the exp2's multiply-add,
``lse`` converted back at the end. ``tile_plan`` decides per tile: a tile is *reached* unless
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
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.sparse_attention_launch import (
    FORWARD_LAUNCH,
    KernelLaunch,
    feature_args,
    kernel_sizes,
    launch_config,
    launch_for_sizes,
    query_grid,
)
from sparse_lens.kernels.sparse_attention_tiles import (
    LN2,
    LOG2E,
    block_and_head,
    dot_into,
    kv_row,
    load_tile,
    scores_log2,
    step_tile_plan,
    store_rows,
    visibility,
)


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
    ``tile_plan``); without ``MASK_ALL`` only where ``needs_mask``.
    """
    tile_rows = tl.arange(0, KEY_TILE)
    keys = load_tile(key_base, load_first_key + tile_rows, seq_len, tl.arange(0, BLOCK_D), d_head, EVEN, KV_EVICTION)
    values = load_tile(value_base, load_first_key + tile_rows, seq_len, tl.arange(0, BLOCK_DV), d_value, EVEN,
                        KV_EVICTION)
    scores, factor, _ = scores_log2(query_tile_values, keys, scale, softcap, HAS_SOFTCAP, FOLD_SCALE,
                                     DOT_PRECISION, DOT_UPCAST)
    key_pos = first_key + tile_rows
    if MASK_ALL:
        scores = tl.where(visibility(key_pos, query_pos, row_limit, window, HAS_WINDOW), scores, float("-inf"))
    elif needs_mask:
        scores = tl.where(visibility(key_pos, query_pos, row_limit, window, HAS_WINDOW), scores, float("-inf"))
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
    accumulator = dot_into(probs.to(values.dtype), values, accumulator * rescale[:, None], DOT_PRECISION, DOT_UPCAST)
    return accumulator, new_max, row_sum, slot_sums


@triton.jit
def forward_kernel(
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
    query_block_id, batch_head = block_and_head(n_q_heads, n_kv_heads, HEADS_INNER)
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
        query_tile_values = load_tile(query_base, query_pos, seq_len, dims, d_head, EVEN, ONCE_EVICTION)
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
            slot, reached, mask_first_key, load_first_key, needs_mask = step_tile_plan(
                step, block_indices_ptr, slots_row, first_query, last_query, seq_len, window, KEY_BLOCK, TILES,
                QUERY_TILE, KEY_TILE, HAS_WINDOW)
            gate = tl.load(block_gate_ptr + slots_row + slot).to(tl.float32) if HAS_GATE else 1.0
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
        store_rows(output_base, query_pos, seq_len, value_dims, d_value, accumulator * inverse_sum[:, None])
        lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("-inf"))
        tl.store(lse_ptr + batch_head * seq_len + query_pos, lse, mask=real)
        if WITH_MASS:
            mass_sum += tl.sum(tl.where(real[:, None], slot_sums * inverse_sum[:, None], 0.0), axis=0)
    if WITH_MASS:
        n_real = tl.minimum(seq_len - query_block_id * QUERY_BLOCK, QUERY_BLOCK)
        tl.store(block_mass_ptr + slots_row + slot_ids, mass_sum / n_real, mask=slot_ids < top_k)



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
    (benchmarks/attention_sweep.py times them), shrunk by ``launch_for_sizes`` where its tiles would
    exceed ``SHARED_MEMORY_BUDGET`` (e.g. d_head 256 in float32: 2 stages; the backward also 32-key tiles).
    """
    batch, n_q_heads = query.shape[:2]
    grid = query_grid(block_indices.shape[2], batch, n_q_heads, key.shape[1], launch.heads_inner)
    launch = launch_for_sizes(launch, query, value, block_indices, query_block, key_block, backward=False)
    config = launch_config(query, value, block_indices, block_gate, query_block, key_block, window, softcap, sinks,
                            scale=scale, launch=launch)
    if not with_mass:
        config |= dict(WITH_MASS=False, SLOTS=2)
    forward_kernel[grid](
        query, key, value, block_indices, block_gate if block_gate is not None else block_mass,
        sinks if sinks is not None else lse,  # unread placeholder without sinks
        output, lse, block_mass, float(scale), *feature_args(window, softcap),
        *kernel_sizes(query, key, value, block_indices),
        **config, **launch.kernel_options(),
    )
