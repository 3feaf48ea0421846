"""Bounds search (Quest-style branch and bound), Triton kernel: the same output as ``search.bounds_estimate``.

The hierarchical search of ``search.py`` with the bounds range score: a candidate range of key
blocks ``[start, end)`` scores ``max_i sum_d max(q_id * kmax_d, q_id * kmin_d)`` over the query
block's scoring queries (every ``query_stride``-th one, counted from the block's last), where
``kmin`` / ``kmax`` are the elementwise min / max of every key in the range. The kernel writes the
bound as ``q+ . kmax + q- . kmin`` (``q+ = max(q, 0)``, ``q- = min(q, 0)``; equal to the
reference's ``q . centre + |q| . radius``, and exact in the inputs' dtype: no arithmetic on keys),
two ``tl.dot`` per round.

Two steps per call:

1. The sparse table (``search.build_sparse_table``, torch ops): level ``l`` at block ``b`` holds
   the min / max of the keys of blocks ``[b, b + 2**l)``, ``[batch, kv_head, levels, n_key_blocks,
   d_head]`` each, in the keys' dtype (min / max are exact). Time O(T d + n_kb log2(n_kb) d) and
   memory O(n_kb log2(n_kb) d) per key head (about 2 x 126 MB at 1M tokens, 64-token blocks,
   2 key heads, bf16).
2. The search, grid ``(n_query_blocks, batch * q_head)`` as ``stream_triton``: one program per
   output row. Rows that see at most ``top_k`` key blocks keep them all; other rows store the sink
   and local blocks and search ``n_search = top_k - sink - local`` branches in
   ``[sink, n_visible - local)``, kept as register vectors padded to ``BRANCH_PAD``. The scoring
   queries' tile is loaded once (as ``q+`` and ``q-``). Each of the ``n_rounds`` rounds
   (``BlockGeometry.search_rounds``, the reference's count) splits every branch in two halves,
   reads each half's key min / max from the table in O(1) (two overlapping power-of-two windows:
   four gathered ``CAND_PAD x BLOCK_D`` tiles), scores the halves with two dots
   (``BLOCK_Q x BLOCK_D x CAND_PAD``, fp32 accumulation), and keeps the best ``n_search`` halves by
   rank counting (``stream_triton``'s order: higher score, then non-empty, then lower candidate).
   The found blocks are stored ascending between the sinks and the locals.

Unlike Stream's score the bound reads no key of the range itself and needs no causal mask: the
table covers the real keys of whole blocks (the reference's semantics; the diagonal block's later
keys count too), and only padding queries (past ``seq_len``) are masked.

Cost per searched row: ``n_rounds`` x (2 dots of ``(query_block / query_stride) x d x 2 n_search``
and 4 gathered tiles of ``2 n_search x d`` table rows): a quarter of Stream's dot FLOPs and half its
gathered rows at its default of 8 representative keys (``query_stride`` 1). Memory: the table and
the ``[batch, q_head, n_query_blocks, top_k]`` output; per program only T-independent tiles.

As the first stage of ``rescored`` it is not yet the better default: end to end on SmolLM2-135M
(8,192 tokens of prose, torch reference on the CPU, selection by each query block's own queries,
``benchmarks/results/fidelity_e2e_8192_bounds.json``), at 64-token blocks and ``top_k`` 4 the
next-token KL is 0.162 (beam 4), 0.166 (beam 4, every 4th query rescored) and 0.132 (beam 8, every
4th query) against 0.118 with Stream's search (0.119 every 4th query; the exact oracle's blocks:
0.112); at ``top_k`` 16, 0.0131 / 0.0149 against 0.0122 / 0.0140 (oracle 0.0123). Its recall is
on par (oracle ratio 0.950 / 0.995 every 4th query, against 0.958 / 0.993).

Ties: the reference ranks with ``torch.topk`` (unspecified order on equal scores) and sums in
another order, so two halves whose bounds are equal to within float noise may be ranked
differently; every other row is identical (``tests/kernels/test_bounds_triton.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import BlockSizeError, InvalidConfigError, ShapeError
from sparse_lens.kernels.blocks import UNUSED_SLOT, BlockGeometry, num_blocks
from sparse_lens.kernels.checks import check_attention_inputs, is_int_at_least
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.search import build_sparse_table
from sparse_lens.kernels.search_selection import keep_best_halves_by_rank, store_branches_ascending

MIN_DOT = 16  # smallest tl.dot dimension
KEY_TILE_BYTES = 32768  # at most one gathered table tile of this size (launch_constants; four per chunk)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNUSED: tl.constexpr = tl.constexpr(UNUSED_SLOT)


@triton.jit
def _range_min_max(table_min_ptr, table_max_ptr, table_base, cand_start, cand_end, non_empty, dims, dim_valid,
                   n_key_blocks, stride_tl, stride_tn, stride_td):
    """Elementwise key min / max of each candidate range ``[start, end)``: two overlapping
    power-of-two windows of the sparse table (``search.range_min_max``); zeros for empty ranges."""
    length = tl.maximum(cand_end - cand_start, 1)
    level = tl.floor(tl.log2(length.to(tl.float32))).to(tl.int32)
    level = level - ((1 << level) > length).to(tl.int32) + ((1 << (level + 1)) <= length).to(tl.int32)
    left = tl.minimum(tl.maximum(cand_start, 0), n_key_blocks - 1)
    right = tl.minimum(tl.maximum(cand_end - (1 << level), 0), n_key_blocks - 1)
    level_offset = level.to(tl.int64) * stride_tl
    mask = non_empty[:, None] & dim_valid[None, :]
    column = dims[None, :] * stride_td
    left_rows = table_base + (level_offset + left.to(tl.int64) * stride_tn)[:, None] + column
    right_rows = table_base + (level_offset + right.to(tl.int64) * stride_tn)[:, None] + column
    low = tl.minimum(tl.load(table_min_ptr + left_rows, mask=mask, other=0.0),
                     tl.load(table_min_ptr + right_rows, mask=mask, other=0.0))
    high = tl.maximum(tl.load(table_max_ptr + left_rows, mask=mask, other=0.0),
                      tl.load(table_max_ptr + right_rows, mask=mask, other=0.0))
    return low, high


@triton.jit
def _signed_queries(rows_ptr, row_valid, first_dim, stride_d, D_HEAD: tl.constexpr, D_CHUNK: tl.constexpr,
                    UPCAST_TILES: tl.constexpr):
    """``q+ = max(q, 0)`` and ``q- = min(q, 0)`` of columns ``[first_dim, first_dim + D_CHUNK)`` of
    the query rows at ``rows_ptr`` (``[rows, 1]`` pointers); zeros for invalid rows and dims."""
    dims = first_dim + tl.arange(0, D_CHUNK)
    tile = tl.load(rows_ptr + dims[None, :] * stride_d, mask=row_valid[:, None] & (dims < D_HEAD)[None, :], other=0.0)
    if UPCAST_TILES:
        tile = tile.to(tl.float32)
    # q . centre + |q| . radius = q+ . kmax + q- . kmin (sign split, exact in any dtype).
    return tl.where(tile > 0, tile, 0.0).to(tile.dtype), tl.where(tile < 0, tile, 0.0).to(tile.dtype)


@triton.jit
def _bounds_search_kernel(
    query_ptr, table_min_ptr, table_max_ptr, block_indices_ptr,
    seq_len, n_query_blocks, n_q_heads, group, n_rounds, n_key_blocks,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_tb, stride_th, stride_tl, stride_tn, stride_td,
    D_HEAD: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr,
    QUERY_BLOCK: tl.constexpr, QUERY_STRIDE: tl.constexpr, FIRST_SLOT: tl.constexpr, N_QUERIES: tl.constexpr,
    BLOCK_Q: tl.constexpr, KEY_BLOCK: tl.constexpr,
    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, SINK_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    N_SEARCH: tl.constexpr, BRANCH_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_TILES: tl.constexpr,
):
    query_block_id = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // n_q_heads
    q_head = batch_head % n_q_heads
    query_end = tl.minimum((query_block_id + 1) * QUERY_BLOCK, seq_len)
    n_visible = (query_end + KEY_BLOCK - 1) // KEY_BLOCK
    row_ptr = block_indices_ptr + (batch_head.to(tl.int64) * n_query_blocks + query_block_id) * TOP_K
    slot = tl.arange(0, TOP_K_PAD)

    if n_visible <= TOP_K:
        # Keep every visible block, then unused slots (-1).
        tl.store(row_ptr + slot, tl.where(slot < n_visible, slot, _UNUSED).to(tl.int64), mask=slot < TOP_K)
    else:
        # Sinks [0, sink) in the first slots, locals [n_visible - local, n_visible) in the last.
        fixed = tl.where(slot < SINK_BLOCKS, slot, n_visible - TOP_K + slot)
        is_fixed = (slot < SINK_BLOCKS) | ((slot >= TOP_K - LOCAL_BLOCKS) & (slot < TOP_K))
        tl.store(row_ptr + slot, fixed.to(tl.int64), mask=is_fixed)

        if N_SEARCH > 0:
            # The scoring queries: slots FIRST_SLOT, FIRST_SLOT + stride, ..., the block's last slot.
            query_rows = tl.arange(0, BLOCK_Q)
            query_pos = query_block_id * QUERY_BLOCK + FIRST_SLOT + query_rows * QUERY_STRIDE
            query_valid = (query_rows < N_QUERIES) & (query_pos < seq_len)
            query_base = query_ptr + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
            query_rows_ptr = query_base + query_pos.to(tl.int64)[:, None] * stride_qt
            if D_CHUNK == BLOCK_D:  # one chunk: the query tile is loaded once for the whole search
                query_plus, query_minus = _signed_queries(query_rows_ptr, query_valid, 0, stride_qd, D_HEAD, D_CHUNK,
                                                          UPCAST_TILES)
            table_base = batch.to(tl.int64) * stride_tb + (q_head // group).to(tl.int64) * stride_th

            # Searched range [sink, n_visible - local) split into N_SEARCH branches; padding
            # branches are empty ([0, 0)) and their candidates are never kept.
            branch = tl.arange(0, BRANCH_PAD)
            branch_is_real = branch < N_SEARCH
            range_len = n_visible - LOCAL_BLOCKS - SINK_BLOCKS
            branch_start = tl.where(branch_is_real, SINK_BLOCKS + branch * range_len // N_SEARCH, 0)
            branch_end = tl.where(branch_is_real, SINK_BLOCKS + (branch + 1) * range_len // N_SEARCH, 0)
            cand = tl.arange(0, 2 * BRANCH_PAD)
            cand_is_real = cand < 2 * N_SEARCH

            for _ in range(n_rounds):
                mid = branch_start + (branch_end - branch_start + 1) // 2
                cand_start = tl.reshape(tl.join(branch_start, mid), [2 * BRANCH_PAD])
                cand_end = tl.reshape(tl.join(mid, branch_end), [2 * BRANCH_PAD])
                non_empty = cand_is_real & (cand_end > cand_start)
                # The bound over the head dimension, D_CHUNK columns at a time.
                bound = tl.zeros([BLOCK_Q, 2 * BRANCH_PAD], tl.float32)
                for chunk in tl.static_range(BLOCK_D // D_CHUNK):
                    if D_CHUNK != BLOCK_D:
                        query_plus, query_minus = _signed_queries(query_rows_ptr, query_valid, chunk * D_CHUNK,
                                                                  stride_qd, D_HEAD, D_CHUNK, UPCAST_TILES)
                    dims = chunk * D_CHUNK + tl.arange(0, D_CHUNK)
                    low, high = _range_min_max(table_min_ptr, table_max_ptr, table_base, cand_start, cand_end,
                                               non_empty, dims, dims < D_HEAD, n_key_blocks, stride_tl, stride_tn,
                                               stride_td)
                    # tl.dot wants one dtype: the table's min / max are key values, exact in the query's dtype
                    # (bf16 on the GPU; fp32 under the interpreter, UPCAST_TILES).
                    low, high = low.to(query_plus.dtype), high.to(query_plus.dtype)
                    bound = tl.dot(query_plus, tl.trans(high), bound, input_precision=DOT_PRECISION)
                    bound = tl.dot(query_minus, tl.trans(low), bound, input_precision=DOT_PRECISION)
                score = tl.max(tl.where(query_valid[:, None], bound, float("-inf")), axis=0)
                score = tl.where(non_empty, score, float("-inf"))
                score = tl.where(score != score, float("inf"), score)  # NaN ranks first, as in torch.topk

                branch_start, branch_end = keep_best_halves_by_rank(
                    score, non_empty, cand, cand_is_real, cand_start, cand_end, branch, N_SEARCH)

            # The found blocks ascending; they all lie between the sinks and the locals.
            store_branches_ascending(row_ptr, branch_start, branch, branch_is_real, SINK_BLOCKS)


def _check_settings(geometry: BlockGeometry, query_stride: int) -> None:
    for name, size in (("query_block", geometry.query_block), ("key_block", geometry.key_block)):
        if size < MIN_DOT or size & (size - 1):
            raise BlockSizeError(
                f"{name} must be a power of two >= {MIN_DOT} for the Triton bounds search, got {size!r} "
                "(use sparse_lens.kernels.search.bounds_estimate for other sizes).")
    if not is_int_at_least(query_stride, 1) or query_stride > geometry.query_block:
        raise InvalidConfigError(
            f"query_stride must be an int in [1, query_block={geometry.query_block}], got {query_stride!r}.")


def bounds_estimate_triton(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Kept key blocks per query block, ascending, ``-1`` in unused slots (int64): the bounds search
    of ``search.bounds_estimate`` (same signature and output), as a Triton kernel; see the module doc.

    Inputs: rotated queries ``[batch, q_head, seq, d_head]`` and keys ``[batch, kv_head, seq,
    d_head]`` (GQA: query head ``h`` reads key head ``h // group``), fp16 / bf16 / fp32, on CUDA
    (or the CPU under ``TRITON_INTERPRET=1``). Raises ``ShapeError`` for malformed q / k,
    ``BlockSizeError`` unless both block sizes are powers of two >= 16, ``InvalidConfigError`` for a
    bad budget or ``query_stride`` (an int in ``[1, query_block]``)."""
    check_attention_inputs(query, key)
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    return bounds_estimate_triton_unchecked(query, key, geometry, query_stride=query_stride)


def bounds_estimate_triton_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """:func:`bounds_estimate_triton` on q / k already checked at the public boundary (``dispatch``
    / ``estimate_blocks``); the kernel's own constraints (block sizes, ``query_stride``, dtype,
    device) are still checked."""
    _check_settings(geometry, query_stride)
    if query.dtype != key.dtype or query.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"query and key must share one dtype of {SUPPORTED_DTYPES}, got {query.dtype}, {key.dtype}.")
    if key.device != query.device:
        raise ShapeError(f"query and key must share a device, got {query.device}, {key.device}.")
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("The Triton bounds search needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU).")
    batch, n_q_heads, seq_len, _ = query.shape
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"] = torch.empty(
        batch, n_q_heads, num_blocks(seq_len, geometry.query_block), geometry.top_k, dtype=torch.int64,
        device=query.device)
    if block_indices.numel():
        _launch(query, key, block_indices, geometry, query_stride)
    return block_indices


@launch_on_tensor_device
def _launch(query: Tensor, key: Tensor, block_indices: Tensor, geometry: BlockGeometry, query_stride: int) -> None:
    """Build the sparse table (torch) and run the kernel into ``block_indices`` (every element written)."""
    table_min, table_max = build_sparse_table(key, geometry.key_block)  # [b, kv_head, levels, n_kb, d], key dtype
    batch, n_q_heads, seq_len, d_head = query.shape
    n_query_blocks = block_indices.shape[2]
    # The Triton interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot (3.9), so it
    # gets fp32 tiles instead (bf16 products are exact in fp32 either way).
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (n_query_blocks, batch * n_q_heads)
    _bounds_search_kernel[grid](
        query, table_min, table_max, block_indices,
        seq_len, n_query_blocks, n_q_heads, n_q_heads // key.shape[1], geometry.search_rounds(seq_len),
        table_min.shape[3],
        *query.stride(), *table_min.stride(),
        **launch_constants(d_head, query.dtype, geometry, query_stride, interpreting, table_dtype=table_min.dtype),
    )


def launch_constants(d_head: int, dtype: torch.dtype, geometry: BlockGeometry, query_stride: int,
                     interpreting: bool, table_dtype: torch.dtype | None = None) -> dict:
    """The kernel's constexprs and launch options for these settings: what ``_launch`` passes, and
    what the sm_90 compile test compiles. As ``stream_launch.launch_constants``: ``num_stages=1``
    (3 stages multi-buffered the gathered table rows: 327,680 B of shared memory at d_head 128, bf16,
    28 branches, on the H200) and the head dimension in chunks such that one gathered table tile
    (``CAND_PAD x D_CHUNK``, in the table's dtype, default the queries') takes at most ``KEY_TILE_BYTES``."""
    n_search = geometry.n_search
    n_queries = -(-geometry.query_block // query_stride)
    branch_pad = max(MIN_DOT // 2, triton.next_power_of_2(max(n_search, 1)))
    block_d = max(MIN_DOT, triton.next_power_of_2(d_head))
    table_dtype = dtype if table_dtype is None else table_dtype
    element_bytes = 4 if table_dtype == torch.float32 or interpreting else 2
    d_chunk = max(MIN_DOT, min(block_d, KEY_TILE_BYTES // (2 * branch_pad * element_bytes)))
    return dict(
        D_HEAD=d_head, BLOCK_D=block_d, D_CHUNK=d_chunk,
        QUERY_BLOCK=geometry.query_block, QUERY_STRIDE=query_stride,
        FIRST_SLOT=(geometry.query_block - 1) % query_stride, N_QUERIES=n_queries,
        BLOCK_Q=max(MIN_DOT, triton.next_power_of_2(n_queries)), KEY_BLOCK=geometry.key_block,
        TOP_K=geometry.top_k, TOP_K_PAD=triton.next_power_of_2(geometry.top_k),
        SINK_BLOCKS=geometry.sink_blocks, LOCAL_BLOCKS=geometry.local_blocks,
        N_SEARCH=n_search, BRANCH_PAD=branch_pad,
        DOT_PRECISION="ieee" if dtype == torch.float32 or interpreting else "tf32",
        UPCAST_TILES=interpreting,
        num_warps=8 if branch_pad >= 64 else 4,  # the 128 x 128 rank comparison (stream_triton)
        num_stages=1,
    )
