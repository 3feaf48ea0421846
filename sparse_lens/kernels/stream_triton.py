"""Stream estimator, Triton kernel: the same output as ``stream.stream_estimate``.

Grid: one program per (query block, batch * query head); the query-block axis comes first
because CUDA allows 2**31 - 1 programs there and only 65535 on the second axis (1M tokens in
16-token blocks is 65536 query blocks). A program works on one output row of ``top_k`` slots:

- rows that see at most ``top_k`` key blocks keep them all: ``0 .. n_visible - 1`` then ``-1``;
  those programs store one short vector and do nothing else;
- other rows store the sink blocks ``[0, sink)`` and the local blocks
  ``[n_visible - local, n_visible)`` directly, and search the ``n_search = top_k - sink - local``
  remaining blocks in ``[sink, n_visible - local)``.

The search keeps ``n_search`` branches ``[branch_start, branch_end)`` as register vectors,
padded to ``BRANCH_PAD`` (a power of two, at least 8, so that the ``CAND_PAD = 2 * BRANCH_PAD``
candidates fill a 16-wide ``tl.dot``; padding is masked). The query block's tile
(``BLOCK_Q x BLOCK_D``, both padded to powers of two >= 16) is loaded once. Each of the
``n_rounds`` rounds (the reference's static count) then:

1. splits every branch at ``mid = start + (end - start + 1) // 2`` into two candidate halves
   (``tl.join`` + ``tl.reshape``: candidate ``2 b`` is the first half of branch ``b``, ``2 b + 1``
   the second);
2. scores every candidate by its centre key block: for each of the ``representative_keys``
   strided key offsets, it gathers one key row per candidate (a ``CAND_PAD x BLOCK_D`` tile),
   computes ``query_tile @ keys.T`` (``BLOCK_Q x CAND_PAD``, fp32 accumulation), masks it
   causally and keeps the running max over queries; empty halves score ``-inf``. Padding query
   rows repeat the block's last real query, which changes no max. The mask is compiled out
   (``MASK_KEYS`` false) when the local blocks span at least a query block: then every searched key
   precedes the block's first query. Otherwise (e.g. ``local_blocks`` 0, the inner estimate of
   causal selection) a round masks only when some candidate's centre block reaches the block's
   first query: in most rounds the branch holding the diagonal is still wide and its centre far
   back (H200, 1M tokens, the 1.5B model's default estimate, ``benchmarks/model.py --profile``: the
   wide search took 117.6 ms per layer masking every round, 96.9 ms masking only these);
3. keeps the best ``n_search`` candidates by rank counting (no sort): a candidate's rank is the
   number of candidates that beat it (higher score; on equal scores a non-empty half beats an
   empty one, then the lower candidate index wins). Ranks are a permutation, so the candidate of
   rank ``r`` becomes branch ``r`` (a ``BRANCH_PAD x CAND_PAD`` compare-and-sum).

At the end the branch starts are sorted by the same rank counting and stored after the sinks.

Rounds per row: the reference runs ``n_rounds`` (``BlockGeometry.search_rounds``, set by the widest
row, the last) for every row; a program stops after ``ceil(log2(ceil(range / n_search)))``, its own
row's count (``search.expanded_rounds`` with ``E = 0``). The skipped rounds change nothing: once
every branch is one block, its halves are the block itself and an empty half, which ranks below
every non-empty candidate, so the same blocks are kept. Rows early in the sequence need fewer rounds
(at 128k the last row needs 6 for the default's 56 branches, a row halfway 5, a quarter of the way 4).

``select="sort"`` replaces both rank countings by ``tl.sort`` (a bitonic network,
``O(C log^2 C)`` compare-swaps for ``C = CAND_PAD`` candidates instead of ``C**2`` compares and
the ``BRANCH_PAD x CAND_PAD`` placement): each candidate's key packs, in one int64, its score
(order-preserving bits, negated so that ascending is best first), an empty flag and its index,
so the sorted order is the rank order above; the first ``BRANCH_PAD`` keys name the kept
candidates, whose ranges ``tl.gather`` reads. Same output as ``"rank"``, ties aside (``-0.0``
and ``0.0`` are ordered by their bits).

Launch choices (``stream_launch.launch_constants``), from the sweeps on the H200
(``benchmarks/search_tiles.py``, ``benchmarks/results/h200_2026-11-30f/c4/``; Qwen2.5-1.5B heads,
bf16, 64-token blocks, 128k tokens):

- Stream's own search (``CAND_PAD`` 32): a queries x keys score tile, rank counting, 4 warps:
  3.2 ms (keys x queries 4.5 ms; sort 4.1 ms; 8 warps 4.3 ms);
- from ``CAND_PAD`` 128 on (the rescored estimator's wide search): a keys x queries score tile
  (``KEY_MAJOR``: ``keys @ query_tile.T``; why this orientation is faster was not profiled),
  the sorted selection and 4 warps: 7.7 ms, against 14.3 ms for queries x keys with rank counting
  and 8 warps (the earlier rule) and 9.0 ms with rank counting. Before the running max and the
  mask-free scores (below) the sort was no faster there (21.2 against 21.3 ms): the time was in
  the per-key reductions, not in the selection;
- each round keeps an element-wise running max over the representative keys in the score tile's
  own layout and reduces over the queries once per round (one reduction per key before: 4.5 to
  3.2 ms for Stream's search, 18.3 to 14.2 ms for the wide one);
- no score mask where none is needed (``MASK_KEYS``, step 2): 4.5 to 4.4 ms and 21.4 to 18.3 ms.

``expand_levels = E > 0`` runs the expanded search of ``stream`` (fewer branches, stopped
``E`` levels early, every block of every branch kept, then the locals and ``-1``). As the rescored
estimator's candidate stage (``E = 2``, 56 candidates at ``top_k`` 16) it searches in 2.6 ms
instead of 21.3 ms at 128k (H200, same run), but its candidates are the neighbourhoods of 14 picks,
not 56 independent ones: oracle ratio 0.895-0.936 against the default's 0.948-0.982 on the
2,048-token SmolLM2 budgets, so it is not the default.

Memory: the only tensor in global memory is the ``[batch, q_head, n_query_blocks, top_k]``
output, O(T). Per program, on chip: the query tile, one key tile, the ``BLOCK_Q x CAND_PAD``
score tile and the ``CAND_PAD x CAND_PAD`` rank comparison, none of which depends on T; no
``(T / block)^2`` intermediate and no scratch. Work per searched row: ``n_rounds *
representative_keys`` dots of ``BLOCK_Q x BLOCK_D x CAND_PAD``, so
O(T * top_k * representative_keys * d * log T) per head, as in the reference.

Measured on one H200 (Triton 3.6, bf16, head dim 128, blocks of 64, top_k 16, sink = local = 1,
8 representative keys; ``benchmarks/rescore.py``, 2026-11-30): 3.1 ms for 12 / 2 heads at 128k
and 34 ms at 1M (4.5 and 49 ms before the running max and the mask-free scores). With each row's
own rounds (2026-12-01, ``local_blocks`` 0 and ``top_k`` 15 as the model runs it): 3.58 to 2.74 ms at
128k and 36.6 to 31.0 ms at 1M; the default's wide search 8.15 to 6.43 ms and 95.5 to 80.0 ms. The rank
comparison grows as ``CAND_PAD ** 2``: the sorted selection takes over from ``CAND_PAD`` 128, and
from ``CAND_PAD`` 256 the kernel runs 8 warps.

Shared memory (232,448 B = 227 KB per block on the H200; over it Triton raises
``OutOfResources`` at launch, before anything is written, and ``dispatch`` runs the torch
reference with a warning). Seen on the H200 (Triton 3.6) with Gemma 3 270M (d_head 256) before
``launch_constants`` took its measures (one pipeline stage, the head dimension in chunks, the sort
from ``CAND_PAD`` 512): the rescored estimator's wide search in float32 (64-token blocks, top_k 16,
beam 4: 58 slots, 56 branches) asked 344,320 B, and its wide search at 16-token blocks and top_k
128 (504 branches, ``CAND_PAD`` 1024) 1,069,056 B in bf16. Compiled for sm_90 on the CPU
(Triton 3.6, aligned-tensor specialisation) they now ask 131,072 B and 16,384 B
(``tests/kernels/test_estimator_triton_compile.py`` checks these and the common settings).

Ties: ``torch.topk`` in the reference leaves the order of equal scores unspecified, so on exactly
equal scores (degenerate inputs, e.g. zero queries) the two may keep different, equally scored
blocks. A ``-inf`` candidate (empty, or the diagonal block when all its representative keys lie
after the last query) never reaches the top-k boundary: every round has at least ``n_search``
finite non-empty candidates.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError, ShapeError
from sparse_lens.kernels.blocks import UNUSED_SLOT, BlockGeometry, num_blocks
from sparse_lens.kernels.checks import check_attention_inputs
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.search_selection import keep_best_halves_by_rank, store_branches_ascending
from sparse_lens.kernels.stream import expanded_branches
from sparse_lens.kernels.stream_launch import Select, check_settings, launch_constants

_UNUSED: tl.constexpr = tl.constexpr(UNUSED_SLOT)
_LAST: tl.constexpr = tl.constexpr(2**63 - 1)  # sorts after every real candidate's key


@triton.jit
def _load_dims(rows_ptr, row_valid, first_dim, stride_d, D_HEAD: tl.constexpr, D_CHUNK: tl.constexpr,
               UPCAST_TILES: tl.constexpr):
    """Columns ``[first_dim, first_dim + D_CHUNK)`` of the rows at ``rows_ptr`` (``[rows, 1]``
    pointers), zeros for invalid rows and dims past ``D_HEAD``; fp32 under ``UPCAST_TILES``."""
    dims = first_dim + tl.arange(0, D_CHUNK)
    tile = tl.load(rows_ptr + dims[None, :] * stride_d, mask=row_valid[:, None] & (dims < D_HEAD)[None, :], other=0.0)
    if UPCAST_TILES:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _stream_estimate_kernel(
    query_ptr, key_ptr, block_indices_ptr,
    seq_len, n_query_blocks, n_q_heads, group, n_rounds,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    D_HEAD: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr,
    QUERY_BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr, KEY_BLOCK: tl.constexpr,
    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, SINK_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    N_SEARCH: tl.constexpr, BRANCH_PAD: tl.constexpr,
    REPRESENTATIVE_KEYS: tl.constexpr, KEY_STRIDE: tl.constexpr, KEY_FIRST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_TILES: tl.constexpr, EXPAND_LEVELS: tl.constexpr, SORT_SELECT: tl.constexpr,
    MASK_KEYS: tl.constexpr, KEY_MAJOR: tl.constexpr,
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
        if EXPAND_LEVELS == 0:
            fixed = tl.where(slot < SINK_BLOCKS, slot, n_visible - TOP_K + slot)
            is_fixed = (slot < SINK_BLOCKS) | ((slot >= TOP_K - LOCAL_BLOCKS) & (slot < TOP_K))
            tl.store(row_ptr + slot, fixed.to(tl.int64), mask=is_fixed)
        else:
            tl.store(row_ptr + slot, slot.to(tl.int64), mask=slot < SINK_BLOCKS)

        if N_SEARCH > 0:
            query_rows = tl.arange(0, BLOCK_Q)
            first_query = query_block_id * QUERY_BLOCK
            # Padding rows repeat the block's last real query: that leaves every candidate's max
            # unchanged, masked or not, so no row needs a validity mask.
            query_pos = tl.minimum(first_query + query_rows, query_end - 1)
            query_valid = query_rows >= 0
            query_base = query_ptr + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
            key_base = key_ptr + batch.to(tl.int64) * stride_kb + (q_head // group).to(tl.int64) * stride_kh
            query_rows_ptr = query_base + query_pos.to(tl.int64)[:, None] * stride_qt
            if D_CHUNK == BLOCK_D:  # one chunk: the query tile is loaded once for the whole search
                query_tile = _load_dims(query_rows_ptr, query_valid, 0, stride_qd, D_HEAD, D_CHUNK, UPCAST_TILES)

            # Searched range [sink, n_visible - local) split into N_SEARCH branches; padding
            # branches are empty ([0, 0)) and their candidates are never kept.
            branch = tl.arange(0, BRANCH_PAD)
            branch_is_real = branch < N_SEARCH
            range_len = n_visible - LOCAL_BLOCKS - SINK_BLOCKS
            branch_start = tl.where(branch_is_real, SINK_BLOCKS + branch * range_len // N_SEARCH, 0)
            branch_end = tl.where(branch_is_real, SINK_BLOCKS + (branch + 1) * range_len // N_SEARCH, 0)
            cand = tl.arange(0, 2 * BRANCH_PAD)
            cand_is_real = cand < 2 * N_SEARCH
            # The row stops once every branch spans <= 2**E blocks (expanded_rounds; E = 0: one block).
            # With E = 0 the reference runs n_rounds for every row, but the rounds after this count
            # change nothing: a one-block branch's halves are itself and an empty one, which ranks
            # below it, so the same blocks are kept (module doc, "Rounds per row").
            widest_branch = (range_len + N_SEARCH - 1) // N_SEARCH
            row_rounds = n_rounds * 0
            for level in range(n_rounds):
                row_rounds += (widest_branch > ((1 << EXPAND_LEVELS) << level)).to(tl.int32)

            for _ in range(row_rounds):
                mid = branch_start + (branch_end - branch_start + 1) // 2
                cand_start = tl.reshape(tl.join(branch_start, mid), [2 * BRANCH_PAD])
                cand_end = tl.reshape(tl.join(mid, branch_end), [2 * BRANCH_PAD])
                non_empty = cand_is_real & (cand_end > cand_start)
                center = tl.where(non_empty, cand_start + (cand_end - cand_start - 1) // 2, 0)

                # Running max over representative keys, element by element in the dot's layout; one
                # reduction over the queries per round, not one per key (module doc: measured faster).
                # KEY_MAJOR: the tile is keys x queries (keys @ query_tile.T), else queries x keys.
                if KEY_MAJOR:
                    best = tl.full([2 * BRANCH_PAD, BLOCK_Q], float("-inf"), tl.float32)
                else:
                    best = tl.full([BLOCK_Q, 2 * BRANCH_PAD], float("-inf"), tl.float32)
                # Only a centre block that reaches the block's first query needs the causal mask: in
                # most rounds none does (the branch holding the diagonal is still wide).
                round_masked = tl.max(tl.where(non_empty, center, 0), axis=0) * KEY_BLOCK + KEY_BLOCK - 1 > first_query
                for rep in range(REPRESENTATIVE_KEYS):
                    key_pos = center * KEY_BLOCK + (KEY_FIRST + rep * KEY_STRIDE)
                    key_rows_ptr = key_base + key_pos.to(tl.int64)[:, None] * stride_kt
                    key_valid = non_empty & (key_pos < seq_len)
                    # q . k over the head dimension, D_CHUNK columns at a time.
                    if KEY_MAJOR:
                        dots = tl.zeros([2 * BRANCH_PAD, BLOCK_Q], tl.float32)
                    else:
                        dots = tl.zeros([BLOCK_Q, 2 * BRANCH_PAD], tl.float32)
                    for chunk in tl.static_range(BLOCK_D // D_CHUNK):
                        if D_CHUNK != BLOCK_D:
                            query_tile = _load_dims(query_rows_ptr, query_valid, chunk * D_CHUNK, stride_qd, D_HEAD,
                                                    D_CHUNK, UPCAST_TILES)
                        key_tile = _load_dims(key_rows_ptr, key_valid, chunk * D_CHUNK, stride_kd, D_HEAD, D_CHUNK,
                                              UPCAST_TILES)
                        if KEY_MAJOR:
                            dots = tl.dot(key_tile, tl.trans(query_tile), dots, input_precision=DOT_PRECISION)
                        else:
                            dots = tl.dot(query_tile, tl.trans(key_tile), dots, input_precision=DOT_PRECISION)
                    if MASK_KEYS:
                        if round_masked:
                            if KEY_MAJOR:
                                dots = tl.where(key_pos[:, None] <= query_pos[None, :], dots, float("-inf"))
                            else:
                                dots = tl.where(key_pos[None, :] <= query_pos[:, None], dots, float("-inf"))
                    best = tl.maximum(best, dots)
                if KEY_MAJOR:
                    score = tl.max(best, axis=1)
                else:
                    score = tl.max(best, axis=0)
                score = tl.where(non_empty, score, float("-inf"))
                score = tl.where(score != score, float("inf"), score)  # NaN ranks first, as in torch.topk

                if SORT_SELECT:
                    # One bitonic sort of int64 keys in the same total order: the score's bits made
                    # order-preserving and negated (descending), then empty after non-empty, then
                    # the candidate index, which the first BRANCH_PAD sorted keys hand to tl.gather.
                    bits = score.to(tl.int32, bitcast=True)
                    descending = ~tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
                    order = (descending.to(tl.int64) << 32) | ((~non_empty).to(tl.int64) << 16) | cand.to(tl.int64)
                    order = tl.sort(tl.where(cand_is_real, order, _LAST))
                    best, _ = tl.split(tl.permute(tl.reshape(order, [2, BRANCH_PAD]), (1, 0)))
                    best = tl.where(branch_is_real, best & 0xFFFF, 0).to(tl.int32)  # padding: any index
                    branch_start = tl.where(branch_is_real, tl.gather(cand_start, best, 0), 0)
                    branch_end = tl.where(branch_is_real, tl.gather(cand_end, best, 0), 0)
                else:
                    branch_start, branch_end = keep_best_halves_by_rank(
                        score, non_empty, cand, cand_is_real, cand_start, cand_end, branch, N_SEARCH)

            # Sort the found blocks ascending; they all lie between the sinks and the locals.
            if EXPAND_LEVELS == 0 and SORT_SELECT:
                found = tl.sort(tl.where(branch_is_real, branch_start, 2147483647))
                tl.store(row_ptr + SINK_BLOCKS + branch, found.to(tl.int64), mask=branch_is_real)
            elif EXPAND_LEVELS == 0:
                store_branches_ascending(row_ptr, branch_start, branch, branch_is_real, SINK_BLOCKS)
            else:
                before = (branch_start[None, :] < branch_start[:, None]) | (
                    (branch_start[None, :] == branch_start[:, None]) & (branch[None, :] < branch[:, None])
                )
                # Every block of every branch, ascending: a branch's blocks start after the blocks of
                # the branches before it; then the local blocks, then -1.
                size = tl.where(branch_is_real, branch_end - branch_start, 0)
                first = tl.sum(tl.where(before & branch_is_real[None, :], size[None, :], 0), axis=1)
                for offset in range(1 << EXPAND_LEVELS):
                    tl.store(row_ptr + SINK_BLOCKS + first + offset, (branch_start + offset).to(tl.int64),
                             mask=branch_is_real & (offset < size))
                tail = SINK_BLOCKS + tl.sum(size, axis=0)
                local_or_unused = tl.where(slot < tail + LOCAL_BLOCKS, n_visible - LOCAL_BLOCKS + slot - tail, _UNUSED)
                tl.store(row_ptr + slot, local_or_unused.to(tl.int64), mask=(slot >= tail) & (slot < TOP_K))
        elif EXPAND_LEVELS > 0:  # nothing searched: the locals follow the sinks
            local = n_visible - TOP_K + slot
            tl.store(row_ptr + slot, local.to(tl.int64), mask=(slot >= TOP_K - LOCAL_BLOCKS) & (slot < TOP_K))


def stream_estimate_triton(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    representative_keys: int = 8,
    expand_levels: int = 0,
    select: Select = "rank",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Kept key blocks per query block, ascending, ``-1`` in unused slots (int64); see the module doc.

    ``expand_levels``: ``E > 0`` runs the expanded search (``stream``'s module doc):
    ``(top_k - sink - local) / 2**E`` branches, stopped at ``2**E`` blocks, all kept.
    ``select``: how each round keeps its best halves, ``"rank"`` (compare-and-count) or
    ``"sort"`` (one bitonic sort of packed keys); the same blocks either way (ties aside). Searches
    of 33 or more branches (``CAND_PAD`` 128) sort whatever ``select`` says (``launch_constants``)."""
    check_attention_inputs(query, key)
    return stream_estimate_triton_unchecked(
        query, key, query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink_blocks,
        local_blocks=local_blocks, representative_keys=representative_keys, expand_levels=expand_levels, select=select,
    )


def stream_estimate_triton_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    representative_keys: int = 8,
    expand_levels: int = 0,
    select: Select = "rank",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """:func:`stream_estimate_triton` for q / k already checked at the public boundary
    (``dispatch`` / ``estimate_blocks``): no tensor checks (``checks.py``); the kernel's own
    constraints on the settings (power-of-two blocks: ``BlockSizeError``) are still checked."""
    check_settings(query_block, key_block, top_k, sink_blocks, local_blocks, representative_keys)
    expanded_branches(top_k - sink_blocks - local_blocks, expand_levels)
    batch, n_q_heads, seq_len, _ = query.shape
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"] = torch.empty(
        batch, n_q_heads, num_blocks(seq_len, query_block), top_k, dtype=torch.int64, device=query.device
    )
    _launch_into(
        query, key, block_indices, query_block=query_block, key_block=key_block, top_k=top_k,
        sink_blocks=sink_blocks, local_blocks=local_blocks, representative_keys=representative_keys,
        expand_levels=expand_levels, select=select,
    )
    return block_indices


def _stream_estimate_into(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    representative_keys: int = 8,
    expand_levels: int = 0,
    select: Select = "rank",
) -> None:
    """Write every element of ``block_indices`` (contiguous int64, the output's shape)."""
    check_attention_inputs(query, key)
    check_settings(query_block, key_block, top_k, sink_blocks, local_blocks, representative_keys)
    _launch_into(query, key, block_indices, query_block=query_block, key_block=key_block, top_k=top_k,
                 sink_blocks=sink_blocks, local_blocks=local_blocks, representative_keys=representative_keys,
                 expand_levels=expand_levels, select=select)


@launch_on_tensor_device
def _launch_into(query: Tensor, key: Tensor, block_indices: Tensor, *, query_block: int, key_block: int, top_k: int,
                 sink_blocks: int, local_blocks: int, representative_keys: int, expand_levels: int,
                 select: Select, tuning: dict | None = None) -> None:
    """The launch behind :func:`_stream_estimate_into`, after the input checks: the output's
    shape, dtype and device (cheap, kept here) and the kernel. ``tuning`` replaces launch
    constants (e.g. ``KEY_MAJOR``, ``num_warps``) for ``benchmarks/search_tiles.py``."""
    n_search = expanded_branches(top_k - sink_blocks - local_blocks, expand_levels)
    if select not in ("rank", "sort"):
        raise InvalidConfigError(f"select must be 'rank' or 'sort', got {select!r}.")
    if key.device != query.device or block_indices.device != query.device:
        raise ShapeError(
            f"query, key and block_indices must share a device, got {query.device}, {key.device}, "
            f"{block_indices.device}."
        )
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("The Triton estimator needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU).")
    batch, n_q_heads, seq_len, d_head = query.shape
    n_query_blocks = num_blocks(seq_len, query_block)
    expected = (batch, n_q_heads, n_query_blocks, top_k)
    if (
        tuple(block_indices.shape) != expected
        or block_indices.dtype != torch.int64
        or not block_indices.is_contiguous()
    ):
        raise ShapeError(
            f"block_indices must be a contiguous int64 tensor of shape {expected}, got "
            f"{tuple(block_indices.shape)} {block_indices.dtype}."
        )
    if block_indices.numel() == 0:
        return
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        query, key = query.float(), key.float()

    # The reference's static round count: enough halvings for the widest searched range.
    n_rounds = BlockGeometry(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink_blocks,
                             local_blocks=local_blocks).search_rounds(seq_len, n_search)

    # The Triton interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot (3.9), so it
    # gets fp32 tiles instead (bf16 products are exact in fp32 either way).
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (n_query_blocks, batch * n_q_heads)
    _stream_estimate_kernel[grid](
        query, key, block_indices,
        seq_len, n_query_blocks, n_q_heads, n_q_heads // key.shape[1], n_rounds,
        *query.stride(), *key.stride(),
        **{**launch_constants(d_head=d_head, dtype=query.dtype, query_block=query_block, key_block=key_block,
                              top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks,
                              representative_keys=representative_keys, expand_levels=expand_levels, select=select,
                              interpreting=interpreting), **(tuning or {})},
    )
