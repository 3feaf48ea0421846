"""Block masses under a given log-sum-exp, Triton kernel: kept blocks, or every visible block.

With ``lse`` the exact (dense) normaliser of each query, the mass a query gives key block ``b`` is
``sum over the keys k of b visible to the query of exp(scale * q . k - lse)``; a block's mass is
that averaged over the query block's queries. Two functions share one kernel:

- ``kept_block_mass_triton``: the mass of each kept block of ``block_indices`` (same signature
  and result as ``sparse_attention.kept_block_mass``). One pass over the kept blocks: the
  cost of block-sparse attention without the values. In observe mode it makes ``block_mass``
  the dense mass, so a row sums to the estimate's exact recall.
- ``block_mass_rows_triton``: the mass of *every* causally visible key block for some query
  blocks (``rows``), [batch, head, len(rows), n_key_blocks]; the exact top-k oracle streams it
  chunk of rows by chunk of rows (``oracle.py``). Reference: ``dense.dense_block_mass``.

Kernel: grid ``(len(rows), batch * q_head)``, one program per (head, query block), owning its
output row (plain stores, deterministic). It walks the query block in query tiles of
``min(query_block, 64)`` rows (queries and their lse loaded once per tile); per tile it loops over
the slots (kept block ids, or key blocks ``0 .. last visible``) and the key tiles of each block,
computes ``p = exp(s - lse)`` with the causal mask, sums it, and adds ``sum / n_real_queries`` to
the slot's output (zero on entry). Rows with ``lse = -inf`` (a query that sees nothing) add 0.
Nothing of size T x T exists anywhere; work is that of ``q k^T`` over the slots.

``window`` and ``softcap`` (constexpr flags ``HAS_WINDOW`` / ``HAS_SOFTCAP``, so the default
compiles as before) cap the scores (``soft_cap``) and mask keys older than the window as the
attention kernels do (``scores_log2`` and ``visibility`` in ``sparse_attention_tiles``); key
tiles wholly outside the window are skipped. A sink needs nothing here: it is part of the given ``lse``.

Inputs are made contiguous; fp32, bf16, fp16; block sizes powers of two >= 16. Under the Triton
interpreter bf16 products are made in fp32 (the interpreter's bf16 ``tl.dot`` is wrong), as in
``sparse_attention_triton``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import BlockSizeError, ShapeError
from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs, check_block_indices
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.sparse_attention_triton import soft_cap

MAX_TILE = 64
MIN_BLOCK = 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _block_mass_kernel(
    query_ptr, key_ptr, lse_ptr, rows_ptr, block_indices_ptr, mass_ptr,
    scale, window, softcap, seq_len, n_q_heads, n_kv_heads, n_query_blocks, n_rows, n_slots, d_head,
    QUERY_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, ALL_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    row = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)  # int64: offsets pass 2**31 on long contexts
    batch, q_head = batch_head // n_q_heads, batch_head % n_q_heads
    kv_batch_head = batch * n_kv_heads + q_head // (n_q_heads // n_kv_heads)
    query_block_id = tl.load(rows_ptr + row).to(tl.int64)
    query_base = query_ptr + batch_head * seq_len * d_head
    key_base = key_ptr + kv_batch_head * seq_len * d_head
    mass_row = mass_ptr + (batch_head * n_rows + row) * n_slots
    slots_row = block_indices_ptr + (batch_head * n_query_blocks + query_block_id) * n_slots
    dims = tl.arange(0, BLOCK_D)
    last_in_block = tl.minimum((query_block_id + 1) * QUERY_BLOCK, seq_len) - 1
    n_real = (last_in_block + 1 - query_block_id * QUERY_BLOCK).to(tl.float32)
    # ALL_BLOCKS: slot b is key block b, for every key block the query block sees.
    slot_count = last_in_block // KEY_BLOCK + 1 if ALL_BLOCKS else n_slots
    for query_tile in range(QUERY_BLOCK // QUERY_TILE):
        first_query = query_block_id * QUERY_BLOCK + query_tile * QUERY_TILE
        query_pos = first_query + tl.arange(0, QUERY_TILE)
        last_query = tl.minimum(first_query + QUERY_TILE, seq_len) - 1
        real = query_pos < seq_len
        in_range = real[:, None] & (dims[None, :] < d_head)
        queries = tl.load(query_base + query_pos[:, None] * d_head + dims[None, :], mask=in_range, other=0.0)
        lse = tl.load(lse_ptr + batch_head * seq_len + query_pos, mask=real, other=float("-inf"))
        seen = lse > float("-inf")
        lse = tl.where(seen, lse, 0.0)
        for slot in range(slot_count):
            key_block_id = slot if ALL_BLOCKS else tl.load(slots_row + slot)
            tile_mass = 0.0
            for key_tile in range(KEY_BLOCK // KEY_TILE):
                first_key = key_block_id * KEY_BLOCK + key_tile * KEY_TILE
                in_reach = (key_block_id >= 0) & (first_key <= last_query)
                if HAS_WINDOW:  # skip tiles older than the window of the tile's first query
                    in_reach = in_reach & (first_key + KEY_TILE > first_query - window + 1)
                if in_reach:
                    key_pos = first_key + tl.arange(0, KEY_TILE)
                    key_range = (key_pos[:, None] < seq_len) & (dims[None, :] < d_head)
                    keys = tl.load(key_base + key_pos[:, None] * d_head + dims[None, :], mask=key_range, other=0.0)
                    if DOT_UPCAST:
                        scores = tl.dot(queries.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
                    else:
                        scores = tl.dot(queries, tl.trans(keys), input_precision=DOT_PRECISION)
                    scores = scores * scale
                    if HAS_SOFTCAP:
                        scores = soft_cap(scores, softcap)
                    visible = (key_pos[None, :] <= query_pos[:, None]) & seen[:, None]
                    if HAS_WINDOW:
                        visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
                    probs = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
                    tile_mass += tl.sum(tl.sum(probs, axis=1), axis=0)
            previous = tl.load(mass_row + slot)
            tl.store(mass_row + slot, previous + tile_mass / n_real)


def check_triton_block_sizes(query_block: int, key_block: int) -> None:
    """Raise ``BlockSizeError`` unless both block sizes are powers of two of at least 16."""
    for name, block in (("query_block", query_block), ("key_block", key_block)):
        if not isinstance(block, int) or block < MIN_BLOCK or block & (block - 1):
            raise BlockSizeError(
                f"The Triton block-mass kernel needs {name} to be a power of two >= {MIN_BLOCK} "
                f"(tl.dot tiles), got {block!r}; use the torch reference for other sizes."
            )


def _check(query: Tensor, key: Tensor, lse: Tensor, query_block: int, key_block: int,
           window: int | None, softcap: float | None) -> None:
    check_attention_inputs(query, key)
    check_attention_features(window, softcap, None, query.shape[1])
    check_triton_block_sizes(query_block, key_block)
    if query.dtype != key.dtype or query.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"query and key must share one dtype of {SUPPORTED_DTYPES}, got {query.dtype}, {key.dtype}.")
    if tuple(lse.shape) != tuple(query.shape[:3]):
        raise ShapeError(f"lse must be [batch, q_head, seq] = {tuple(query.shape[:3])}, got {tuple(lse.shape)}.")


@launch_on_tensor_device
def _launch(query, key, lse, rows, block_indices, mass, *, query_block, key_block, scale, all_blocks,
            window=None, softcap=None) -> None:
    """Run the kernel into ``mass`` (float32 zeros [batch, q_head, len(rows), n_slots])."""
    batch, n_q_heads, seq_len, d_head = query.shape
    n_slots = mass.shape[-1]
    grid = (rows.numel(), batch * n_q_heads)
    _block_mass_kernel[grid](
        query, key, lse, rows, block_indices, mass,
        float(scale), 0 if window is None else int(window), 1.0 if softcap is None else float(softcap),
        seq_len, n_q_heads, key.shape[1], num_blocks(seq_len, query_block), rows.numel(), n_slots, d_head,
        QUERY_BLOCK=query_block, KEY_BLOCK=key_block,
        QUERY_TILE=min(query_block, MAX_TILE), KEY_TILE=min(key_block, MAX_TILE),
        BLOCK_D=max(MIN_BLOCK, triton.next_power_of_2(d_head)), ALL_BLOCKS=all_blocks,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        DOT_UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=4,
    )


def kept_block_mass_triton(
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

    Same contract as ``sparse_attention.kept_block_mass``; unused slots (-1) get 0.
    """
    _check(query, key, lse, query_block, key_block, window, softcap)
    n_query_blocks = num_blocks(query.shape[2], query_block)
    check_block_indices(block_indices, query, n_query_blocks)
    mass: Float[Tensor, "batch q_head n_query_blocks top_k"] = query.new_zeros(block_indices.shape, dtype=torch.float32)
    rows = torch.arange(n_query_blocks, device=query.device, dtype=torch.int32)
    _launch(query.contiguous(), key.contiguous(), lse.float().contiguous(), rows,
            block_indices.to(torch.int32).contiguous(), mass,
            query_block=query_block, key_block=key_block, scale=scale, all_blocks=False, window=window, softcap=softcap)
    return mass


def block_mass_rows_triton(
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
    """Mass of every key block for the query blocks ``rows`` (ascending block ids).

    ``n_key_blocks`` is the number of key blocks the last of ``rows`` sees; blocks a row does not
    see (after it, or older than its ``window``) get 0. Memory: the output only,
    ``len(rows) * n_key_blocks`` floats per head.
    """
    _check(query, key, lse, query_block, key_block, window, softcap)
    rows = rows.to(device=query.device, dtype=torch.int32).contiguous()
    seq_len = query.shape[2]
    last_query = min((int(rows.max()) + 1) * query_block, seq_len) - 1 if rows.numel() else 0
    n_key_blocks = last_query // key_block + 1
    mass: Float[Tensor, "batch q_head n_rows n_key_blocks"] = query.new_zeros(
        (query.shape[0], query.shape[1], rows.numel(), n_key_blocks), dtype=torch.float32
    )
    if rows.numel():
        _launch(query.contiguous(), key.contiguous(), lse.float().contiguous(), rows, rows, mass,
                query_block=query_block, key_block=key_block, scale=scale, all_blocks=True, window=window,
                softcap=softcap)
    return mass
