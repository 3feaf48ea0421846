"""Fused rescoring, Triton kernel: exact candidate block masses from ``q . k`` alone, and the selection.

Three entry points, each with the signature and semantics of its torch reference in
``rescore_ref.py`` (the test oracles):

| Triton | reference | returns |
|---|---|---|
| ``exact_candidate_mass_triton`` | ``exact_candidate_mass`` | float32 ``[batch, q_head, n_query_blocks, width]`` |
| ``rescore_top_k_triton`` | ``rescore_top_k`` | int64 ``[batch, q_head, n_query_blocks, min(top_k, width)]`` |
| ``rescore_top_p_triton`` | ``rescore_top_p`` | int64 ``[batch, q_head, n_query_blocks, width]`` |

One launch, grid ``(n_query_blocks, batch * q_head)`` (``HEADS_INNER``: a GQA group's query heads
side by side on each query block): a program owns one (head, query block) row
of ``width`` candidate key blocks (``-1`` = no candidate) and

1. takes the block's queries at slots ``query_block - 1, query_block - 1 - stride, ...`` (every
   ``query_stride``-th query counted from the last, as the reference), in tiles of at most 64 rows;
2. walks the candidates' keys once, tile by tile (one flat loop over (slot, key tile) pairs), with
   an online log-sum-exp in base 2: a running row max and a ``[query_tile, SLOTS]`` register tensor
   of per-slot partial sums, all rescaled when the row max moves. No values are read and nothing is
   written per key: at the end ``slot_sums / slot_sums.sum(1)`` is, per query, the softmax over the
   candidates of their exact block log-masses; averaged over the block's real queries (queries
   seeing no candidate key count as 0, as in the reference) it is the candidate's ``block_mass``.
   Each tile is planned as in the attention forward (``sparse_attention_tiles.tile_plan``): the
   causal mask only where some query of the tile does not see some key of it (the diagonal, an
   unused slot, padding; ``MASK_ALL`` masks every tile), unmasked loads where the tiles are whole
   (``EVEN``), the scale folded into the ``exp2``'s multiply-add (``FOLD_SCALE``). On the H200
   (``benchmarks/search_tiles.py --rescore``, the wide search's 58 candidates, Qwen2.5-1.5B heads):
   4.56 ms at 128k and 45.0 ms at 1M, against 7.92 and 61.8 ms masking every tile with masked row
   loads and ``exp``; every 4th query costs about the same (4.11 / 37.5 ms): the gathered key tiles'
   loads, not the arithmetic, bound it;
3. ``MODE`` 0 stores the masses; 1 keeps the sink / local candidates and then the heaviest,
   ``min(top_k, valid)`` in all (``keep_heaviest``); 2 keeps, heaviest first (sink / local first of
   all), the fewest whose mass reaches ``p``, at least ``max(min_blocks, n_fixed)`` (``select_top_p``).
   Selection is sort-free: a slot's rank is the number of slots that beat it (higher key; on equal
   keys the lower slot), the mass ranked before it is a ``[SLOTS, SLOTS]`` compare-and-sum, and the
   kept blocks are written ascending by the same rank counting, ``-1`` after them.

Cost per (head, query block): ``width * key_block * (query_block / query_stride) * d`` multiply-adds
(the logits over the candidates: half of attention's FLOPs, a quarter of the two-kernel path's
bytes since no values are loaded), plus ``SLOTS**2`` compares. Memory: the output only, O(T).

``masked_loop=True`` (the default) walks every candidate's key tiles without a branch: a ``-1``
slot's or a future tile's keys are read at block 0 and masked as positions from ``seq_len`` on
(``-inf`` scores, a sum of 0 and a rescale by ``exp2(0) = 1``), so the output is bit-identical
to ``masked_loop=False`` (an ``if`` around each tile, which skips dead tiles but keeps Triton from
pipelining the loads). Measured on
the H200 (``benchmarks/kernels.py``, Qwen2.5-1.5B heads, ``top_k`` 16, beam 4: 58 candidates;
``benchmarks/results/h200_2026-11-30b/``): the rescoring takes 7.7 ms instead of 8.2 ms at 128k
and 64 ms instead of 69 ms at 1M (estimate minus search, same run).

Ties: the reference sorts stably by the same key, so the two agree except when two masses are equal
to within rounding (e.g. two candidates no sampled query sees, both 0): then either may be kept.

Block sizes: powers of two >= 16 (as the attention kernel; ``tl.dot`` tiles); under the Triton
interpreter bf16 products are made in fp32 (``sparse_attention_triton``'s workaround).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.blocks import check_estimator_settings, num_blocks
from sparse_lens.kernels.checks import check_attention_inputs, check_block_indices, is_int_at_least
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.sparse_attention_launch import (
    MAX_TILE,
    MIN_BLOCK,
    SUPPORTED_DTYPES,
    check_triton_block_sizes,
    query_grid,
)
from sparse_lens.kernels.sparse_attention_tiles import (
    block_and_head,
    kv_row,
    load_rows,
    load_tile,
    scores_log2,
    step_tile_plan,
    visibility,
)


MODE_MASS, MODE_TOP_K, MODE_TOP_P = 0, 1, 2


@triton.jit
def _add_key_tile(queries, key_base, mask_first_key, load_first_key, needs_mask, row_limit, query_pos, seq_len, scale,
                  d_head, slot, row_max, slot_sums, KEY_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                  SLOTS: tl.constexpr, EVEN: tl.constexpr, FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Online log-sum-exp step (base 2): one key tile of candidate ``slot`` into ``(row_max, slot_sums)``.

    Keys are read at ``load_first_key`` and masked as the positions from ``mask_first_key``
    (``tile_plan``); without ``MASK_ALL`` only where ``needs_mask``."""
    tile_rows = tl.arange(0, KEY_TILE)
    keys = load_tile(key_base, load_first_key + tile_rows, seq_len, tl.arange(0, BLOCK_D), d_head, EVEN, "")
    scores, factor, _ = scores_log2(queries, keys, scale, 0.0, False, FOLD_SCALE, DOT_PRECISION, DOT_UPCAST)
    key_pos = mask_first_key + tile_rows
    if MASK_ALL:
        scores = tl.where(visibility(key_pos, query_pos, row_limit, 0, False), scores, float("-inf"))
    elif needs_mask:
        scores = tl.where(visibility(key_pos, query_pos, row_limit, 0, False), scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1) * factor)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows seeing nothing yet
    tile_sum = tl.sum(tl.exp2(scores * factor - shift[:, None]), axis=1)
    in_slot = tl.where(tl.arange(0, SLOTS)[None, :] == slot, tile_sum[:, None], 0.0)
    return new_max, slot_sums * tl.exp2(row_max - shift)[:, None] + in_slot


@triton.jit
def _candidate_mass(
    query_base, key_base, slots_row, candidates_ptr, query_block_id, scale, seq_len, width, d_head,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_STRIDE: tl.constexpr, N_QUERIES: tl.constexpr,
    QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, MASKED_LOOP: tl.constexpr, EVEN: tl.constexpr,
    FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr,
):
    """``[SLOTS]`` block masses of the row's candidates (0 beyond ``width`` and for ``-1`` slots)."""
    dims = tl.arange(0, BLOCK_D)
    mass_sum = tl.zeros([SLOTS], dtype=tl.float32)
    n_real = 0
    block_last = query_block_id * QUERY_BLOCK + QUERY_BLOCK - 1
    TILES: tl.constexpr = KEY_BLOCK // KEY_TILE
    for query_tile in range((N_QUERIES + QUERY_TILE - 1) // QUERY_TILE):
        row = query_tile * QUERY_TILE + tl.arange(0, QUERY_TILE)
        query_pos = block_last - QUERY_STRIDE * (N_QUERIES - 1 - row)
        real = (row < N_QUERIES) & (query_pos < seq_len)
        query_pos = tl.where(real, query_pos, seq_len)  # padded rows: loaded as 0, left out of the mass (real)
        row_limit = tl.where(real, query_pos, -1)
        first_query = tl.min(query_pos, axis=0)
        last_query = tl.max(row_limit, axis=0)
        queries = load_rows(query_base, query_pos, seq_len, dims, d_head)
        row_max = tl.full([QUERY_TILE], float("-inf"), dtype=tl.float32)
        slot_sums = tl.zeros([QUERY_TILE, SLOTS], dtype=tl.float32)
        for step in tl.range(0, width * TILES):  # (slot, key tile) pairs, key tiles fastest
            slot, reached, mask_first_key, load_first_key, needs_mask = step_tile_plan(
                step, candidates_ptr, slots_row, first_query, last_query, seq_len, 0, KEY_BLOCK, TILES, QUERY_TILE,
                KEY_TILE, False)
            if MASKED_LOOP:  # no branch: an unreached tile is read at block 0 and masked (adds 0)
                row_max, slot_sums = _add_key_tile(
                    queries, key_base, mask_first_key, load_first_key, needs_mask, row_limit, query_pos, seq_len,
                    scale, d_head, slot, row_max, slot_sums, KEY_TILE, BLOCK_D, SLOTS, EVEN, FOLD_SCALE, MASK_ALL,
                    DOT_PRECISION, DOT_UPCAST)
            elif reached:
                row_max, slot_sums = _add_key_tile(
                    queries, key_base, mask_first_key, load_first_key, needs_mask, row_limit, query_pos, seq_len,
                    scale, d_head, slot, row_max, slot_sums, KEY_TILE, BLOCK_D, SLOTS, EVEN, FOLD_SCALE, MASK_ALL,
                    DOT_PRECISION, DOT_UPCAST)
        row_sum = tl.sum(slot_sums, axis=1)
        seen = real & (row_sum > 0.0)
        inverse_sum = tl.where(seen, 1.0 / tl.where(seen, row_sum, 1.0), 0.0)
        mass_sum += tl.sum(slot_sums * inverse_sum[:, None], axis=0)
        n_real += tl.sum(real.to(tl.int32), axis=0)
    return mass_sum / tl.maximum(n_real, 1).to(tl.float32)


@triton.jit
def _rescore_kernel(
    query_ptr, key_ptr, candidates_ptr, out_ptr,
    scale, p, seq_len, n_q_heads, n_kv_heads, n_query_blocks, width, out_width, d_head, min_blocks,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_STRIDE: tl.constexpr, N_QUERIES: tl.constexpr,
    QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr,
    OUT_PAD: tl.constexpr, SINK_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, MASKED_LOOP: tl.constexpr, EVEN: tl.constexpr,
    FOLD_SCALE: tl.constexpr, MASK_ALL: tl.constexpr, HEADS_INNER: tl.constexpr,
):
    query_block_id, batch_head = block_and_head(n_q_heads, n_kv_heads, HEADS_INNER)
    kv_batch_head = kv_row(batch_head, n_q_heads, n_kv_heads)
    row_id = batch_head * n_query_blocks + query_block_id
    slots_row = row_id * width
    slot_ids = tl.arange(0, SLOTS)
    mass = _candidate_mass(
        query_ptr + batch_head * seq_len * d_head, key_ptr + kv_batch_head * seq_len * d_head, slots_row,
        candidates_ptr, query_block_id, scale, seq_len, width, d_head,
        QUERY_BLOCK, KEY_BLOCK, QUERY_STRIDE, N_QUERIES, QUERY_TILE, KEY_TILE, BLOCK_D, SLOTS,
        DOT_PRECISION, DOT_UPCAST, MASKED_LOOP, EVEN, FOLD_SCALE, MASK_ALL,
    )
    if MODE == 0:
        tl.store(out_ptr + slots_row + slot_ids, mass, mask=slot_ids < width)
    else:
        blocks = tl.load(candidates_ptr + slots_row + slot_ids, mask=slot_ids < width, other=-1)
        valid = blocks >= 0
        n_visible = (tl.minimum((query_block_id + 1) * QUERY_BLOCK, seq_len) + KEY_BLOCK - 1) // KEY_BLOCK
        fixed = valid & ((blocks < SINK_BLOCKS) | (blocks >= n_visible - LOCAL_BLOCKS))
        rank_key = tl.where(valid, mass, -1.0) + tl.where(fixed, 2.0, 0.0)
        # beats[i, j]: slot j is ranked before slot i (stable descending order of rank_key)
        beats = (rank_key[None, :] > rank_key[:, None]) | (
            (rank_key[None, :] == rank_key[:, None]) & (slot_ids[None, :] < slot_ids[:, None]))
        rank = tl.sum(beats.to(tl.int32), axis=1)
        n_valid = tl.sum(valid.to(tl.int32), axis=0)
        if MODE == 1:
            n_keep = tl.minimum(out_width, n_valid)
        else:
            mass_before = tl.sum(tl.where(beats & valid[None, :], mass[None, :], 0.0), axis=1)
            n_reaching = tl.sum(((mass_before < p) & (slot_ids < width)).to(tl.int32), axis=0)
            n_keep = tl.maximum(tl.maximum(n_reaching, tl.sum(fixed.to(tl.int32), axis=0)), min_blocks)
            n_keep = tl.minimum(n_keep, n_valid)
        kept = valid & (rank < n_keep)
        # ascending output: a kept block's position is the number of kept blocks below it
        below = kept[None, :] & (blocks[None, :] < blocks[:, None])
        position = tl.sum(below.to(tl.int32), axis=1)
        out_slots = tl.arange(0, OUT_PAD)
        placed = kept[None, :] & (position[None, :] == out_slots[:, None])  # [OUT_PAD, SLOTS]
        out = tl.sum(tl.where(placed, blocks[None, :], 0), axis=1)
        out = tl.where(out_slots < n_keep, out, -1)
        tl.store(out_ptr + row_id * out_width + out_slots, out.to(tl.int64), mask=out_slots < out_width)


@launch_on_tensor_device
def _launch(query, key, candidates, out, *, mode: int, query_block: int, key_block: int, scale: float,
            query_stride: int, sink_blocks: int = 0, local_blocks: int = 0, p: float = 1.0,
            min_blocks: int = 1, masked_loop: bool = True, tuning: dict | None = None) -> None:
    """Run the kernel into ``out`` (every element written): contiguous q, k, int32 ``candidates``;
    ``out`` float32 of the candidates' shape (mode 0) or int64 ``[..., out_width]`` (modes 1, 2).
    The tests call it with poisoned buffers. ``tuning`` replaces launch constants (``num_warps``,
    ``num_stages``, ``MASK_ALL``, ``HEADS_INNER``) for ``benchmarks/search_tiles.py``."""
    batch, n_q_heads, seq_len, d_head = query.shape
    n_query_blocks, width = candidates.shape[2:]
    if out.numel() == 0:
        return
    constants = {**launch_constants(mode=mode, d_head=d_head, dtype=query.dtype, width=width, out_width=out.shape[-1],
                                    query_block=query_block, key_block=key_block, query_stride=query_stride,
                                    sink_blocks=sink_blocks, local_blocks=local_blocks, masked_loop=masked_loop,
                                    interpreting=os.environ.get("TRITON_INTERPRET") == "1", seq_len=seq_len,
                                    scale=scale),
                 **(tuning or {})}
    n_kv_heads = key.shape[1]
    grid = query_grid(n_query_blocks, batch, n_q_heads, n_kv_heads, constants["HEADS_INNER"])
    _rescore_kernel[grid](
        query, key, candidates, out,
        float(scale), float(p), seq_len, n_q_heads, n_kv_heads, n_query_blocks, width, out.shape[-1], d_head,
        int(min_blocks), **constants,
    )


def launch_constants(*, mode: int, d_head: int, dtype: torch.dtype, width: int, out_width: int, query_block: int,
                     key_block: int, query_stride: int, sink_blocks: int, local_blocks: int, masked_loop: bool,
                     interpreting: bool, seq_len: int, scale: float) -> dict:
    """The kernel's constexprs and launch options for these settings: what ``_launch`` passes, and
    what the sm_90 compile test compiles (``tests/kernels/test_estimator_triton_compile.py``).

    As the attention forward's defaults (``sparse_attention_launch.FORWARD_LAUNCH``): key tiles
    unmasked where every query of the tile sees every key (``MASK_ALL`` off; a branch per tile),
    wholly in-range tiles loaded without row masks (``EVEN``), the scale folded into the ``exp2``'s
    multiply-add (``FOLD_SCALE``), query blocks fastest within one head (``HEADS_INNER`` off).
    4 warps at every width, and 2 pipeline stages above 64 candidates (H200, 128k tokens,
    ``benchmarks/search_tiles.py --rescore --beams 6 8``, ``benchmarks/results/h200_2026-12-01/c3/``:
    86 candidates 7.65 ms with 2 stages, 9.01 ms with 3, 18.0 ms with 8 warps, the earlier rule above
    64 candidates; 114 candidates 9.88, 11.93 and 23.4 ms)."""
    n_queries = -(-query_block // query_stride)
    key_tile = min(key_block, MAX_TILE)
    block_d = max(MIN_BLOCK, triton.next_power_of_2(d_head))
    return dict(
        QUERY_BLOCK=query_block, KEY_BLOCK=key_block, QUERY_STRIDE=query_stride, N_QUERIES=n_queries,
        QUERY_TILE=min(max(MIN_BLOCK, triton.next_power_of_2(n_queries)), MAX_TILE),
        KEY_TILE=key_tile, BLOCK_D=block_d,
        SLOTS=max(2, triton.next_power_of_2(width)), OUT_PAD=max(2, triton.next_power_of_2(out_width)),
        SINK_BLOCKS=sink_blocks, LOCAL_BLOCKS=local_blocks, MODE=mode,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        DOT_UPCAST=dtype == torch.bfloat16 and interpreting, MASKED_LOOP=bool(masked_loop),
        EVEN=seq_len % key_tile == 0 and block_d == d_head, FOLD_SCALE=scale > 0, MASK_ALL=False,
        HEADS_INNER=False, num_warps=4, num_stages=3 if width <= 64 else 2,
    )


def _prepare(query, key, candidates, query_block: int, key_block: int, query_stride: int, inputs_checked: bool):
    """Validate once (the tensor checks of ``checks.py`` only when the caller has not:
    ``inputs_checked``); contiguous q, k in a supported dtype and int32 candidates."""
    if not inputs_checked:
        check_attention_inputs(query, key)
    check_triton_block_sizes(query_block, key_block)
    if not inputs_checked:
        check_block_indices(candidates, query, num_blocks(query.shape[2], query_block))
    if not is_int_at_least(query_stride, 1) or query_stride > query_block:
        raise ValueError(f"query_stride must be an int in [1, query_block={query_block}], got {query_stride!r}.")
    if query.dtype != key.dtype or query.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"query and key must share one dtype of {SUPPORTED_DTYPES}, got {query.dtype}, {key.dtype}.")
    if not (query.device == key.device == candidates.device):
        raise ShapeError(f"query, key and candidates must share a device, got {query.device}, {key.device}, "
                         f"{candidates.device}.")
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("The Triton rescoring needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU).")
    return query.contiguous(), key.contiguous(), candidates.to(torch.int32).contiguous()


def exact_candidate_mass_triton(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    scale: float | None = None,
    query_stride: int = 1,
    masked_loop: bool = True,
    inputs_checked: bool = False,
) -> Float[Tensor, "batch q_head n_query_blocks width"]:
    """Each candidate's share of its query block's attention over the candidates (``rescore_ref.
    exact_candidate_mass``): per sampled query a softmax over the candidates' exact block
    log-sum-exps, averaged over the block's real sampled queries; 0 for ``-1`` slots.
    ``inputs_checked``: the caller (``dispatch``) has checked q, k and the candidates; the same
    keyword on the two selections below."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    query, key, candidates = _prepare(query, key, candidates, query_block, key_block, query_stride, inputs_checked)
    mass: Float[Tensor, "batch q_head n_query_blocks width"] = torch.empty(
        candidates.shape, dtype=torch.float32, device=query.device)
    _launch(query, key, candidates, mass, mode=MODE_MASS, query_block=query_block, key_block=key_block,
            scale=scale, query_stride=query_stride, masked_loop=masked_loop)
    return mass


def rescore_top_k_triton(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float | None = None,
    query_stride: int = 1,
    masked_loop: bool = True,
    inputs_checked: bool = False,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Sink and local candidates, then the heaviest by exact mass, ``top_k`` valid slots in all
    (``rescore_ref.rescore_top_k``): ascending, ``-1`` in unused slots, width ``min(top_k, width)``."""
    check_estimator_settings(query_block, key_block, top_k, sink_blocks, local_blocks)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    query, key, candidates = _prepare(query, key, candidates, query_block, key_block, query_stride, inputs_checked)
    kept: Int[Tensor, "batch q_head n_query_blocks top_k"] = torch.empty(
        (*candidates.shape[:3], min(top_k, candidates.shape[-1])), dtype=torch.int64, device=query.device)
    _launch(query, key, candidates, kept, mode=MODE_TOP_K, query_block=query_block, key_block=key_block,
            scale=scale, query_stride=query_stride, sink_blocks=sink_blocks, local_blocks=local_blocks,
            masked_loop=masked_loop)
    return kept


def rescore_top_p_triton(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    sink_blocks: int,
    local_blocks: int,
    p: float,
    min_blocks: int,
    scale: float | None = None,
    query_stride: int = 1,
    masked_loop: bool = True,
    inputs_checked: bool = False,
) -> Int[Tensor, "batch q_head n_query_blocks width"]:
    """Per row the fewest candidates, heaviest by exact mass first (sink / local first of all), whose
    mass reaches ``p``; at least ``min_blocks`` (``rescore_ref.rescore_top_p``): ascending, ``-1``
    in unused slots, the candidates' width. No sort: ranks by compare-and-count in the kernel."""
    check_estimator_settings(query_block, key_block, max(min_blocks, sink_blocks + local_blocks, 1),
                             sink_blocks, local_blocks)
    if not 0.0 < p <= 1.0 or min_blocks < 1:
        raise ValueError(f"need 0 < p <= 1 and min_blocks >= 1, got p={p!r}, min_blocks={min_blocks!r}.")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    query, key, candidates = _prepare(query, key, candidates, query_block, key_block, query_stride, inputs_checked)
    kept: Int[Tensor, "batch q_head n_query_blocks width"] = torch.empty(
        candidates.shape, dtype=torch.int64, device=query.device)
    _launch(query, key, candidates, kept, mode=MODE_TOP_P, query_block=query_block, key_block=key_block,
            scale=scale, query_stride=query_stride, sink_blocks=sink_blocks, local_blocks=local_blocks, p=p,
            min_blocks=min_blocks, masked_loop=masked_loop)
    return kept
