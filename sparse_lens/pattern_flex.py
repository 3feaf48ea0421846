"""FlexAttention's vocabulary for a block selection: a ``BlockMask`` export and a text grid.

``torch.nn.attention.flex_attention.BlockMask`` stores, per (batch, head, query block), the number
of kept key blocks (``kv_num_blocks``) and their indices in a ``[.., Q_BLOCKS, KV_BLOCKS]`` table
(``kv_indices``; only the first ``kv_num_blocks`` entries of a row count), plus the transposed
table for the backward pass. That table is quadratic in the number of blocks (8.6 GB per 32-head
layer at 1M tokens with 128-token blocks), so the export is refused beyond ``max_bytes``; the
compact ``[.., Q_BLOCKS, top_k]`` list of :class:`~sparse_lens.pattern.BlockSparsePattern` stays
the primary artefact.

Every kept block is exported as a *partial* block. The ``mask_mod`` is causal (``q_idx >= kv_idx``,
the token-level mask inside diagonal blocks, as in sparse_lens' kernels) **and** looks the block up
in a [batch, head, Q_BLOCKS, KV_BLOCKS] bool table, so it selects exactly the kept blocks also where
FlexAttention evaluates ``mask_mod`` on every entry (its eager, uncompiled path).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from sparse_lens.errors import ContextTooLongError
from sparse_lens.kernels.blocks import num_blocks, visible_key_blocks

DEFAULT_BLOCK_MASK_BYTES = 2**30


def block_mask_bytes(batch: int, heads: int, n_query_blocks: int, n_key_blocks: int) -> int:
    """Bytes of a BlockMask's tables: int32 ``kv_indices`` [.., Q, KV] and ``q_indices`` [.., KV, Q],
    and the mask_mod's bool lookup table [.., Q, KV]."""
    return (2 * 4 + 1) * batch * heads * n_query_blocks * n_key_blocks


def kept_block_mask_mod(kept: Bool[Tensor, "batch head n_query_blocks n_key_blocks"], query_block: int, key_block: int):
    """FlexAttention ``mask_mod``: causal, and the key's block kept in the query's row."""

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & kept[batch, head, q_idx // query_block, kv_idx // key_block]

    return mask_mod


def block_mask_from_indices(
    block_indices: Int[Tensor, "batch head n_query_blocks top_k"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    max_bytes: int = DEFAULT_BLOCK_MASK_BYTES,
) -> BlockMask:
    """A FlexAttention ``BlockMask`` keeping exactly the listed key blocks (with the causal mask inside).

    Args:
        block_indices: [batch, head, n_query_blocks, top_k], ascending, ``-1`` = unused (last).
        seq_len, query_block, key_block: the geometry (``BLOCK_SIZE = (query_block, key_block)``).
        max_bytes: refuse the export when the BlockMask's index tables would exceed this.

    Raises:
        ContextTooLongError: the ``[.., Q_BLOCKS, KV_BLOCKS]`` tables would exceed ``max_bytes``.
        The rows must be valid (ascending, ``-1`` last): ``BlockSparsePattern.validated()``.
    """
    batch, heads, n_rows, top_k = block_indices.shape
    n_key_blocks = num_blocks(seq_len, key_block)
    needed = block_mask_bytes(batch, heads, n_rows, n_key_blocks)
    if needed > max_bytes:
        raise ContextTooLongError(
            f"a BlockMask for [{batch}, {heads}] x {n_rows} query blocks x {n_key_blocks} key blocks needs "
            f"{needed / 2**30:.2f} GiB of index tables (kv_indices [.., Q_BLOCKS, KV_BLOCKS] and its transpose); "
            f"the limit is max_bytes={max_bytes}. Use the compact kv_indices / kv_num_blocks, a shorter "
            "sequence, larger blocks, or raise max_bytes if you have the memory."
        )
    used = block_indices >= 0
    kv_num_blocks = used.sum(-1).to(torch.int32)
    kv_indices = torch.zeros(batch, heads, n_rows, n_key_blocks, dtype=torch.int32, device=block_indices.device)
    width = min(top_k, n_key_blocks)
    kv_indices[..., :width] = torch.where(used, block_indices, 0)[..., :width].to(torch.int32)
    # The extra last column collects the unused slots and is dropped.
    kept = torch.zeros(batch, heads, n_rows, n_key_blocks + 1, dtype=torch.bool, device=block_indices.device)
    kept.scatter_(-1, torch.where(used, block_indices, n_key_blocks), True)
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, BLOCK_SIZE=(query_block, key_block),
        mask_mod=kept_block_mask_mod(kept[..., :n_key_blocks].contiguous(), query_block, key_block),
        seq_lengths=(seq_len, seq_len),
    )


def block_grid(
    block_indices: Int[Tensor, "n_query_blocks top_k"], *, seq_len: int, query_block: int, key_block: int,
) -> list[str]:
    """Rows of text, one per query block: ``█`` kept, ``░`` causal but pruned, space not causal."""
    n_rows = block_indices.shape[0]
    n_key_blocks = num_blocks(seq_len, key_block)
    kept = torch.zeros(n_rows, n_key_blocks + 1, dtype=torch.bool)
    kept.scatter_(1, torch.where(block_indices >= 0, block_indices, n_key_blocks).cpu(), True)
    visible = visible_key_blocks(seq_len, query_block, key_block)
    lines = []
    for row in range(n_rows):
        cells = [
            "█" if kept[row, col] else ("░" if col < int(visible[row]) else " ") for col in range(n_key_blocks)
        ]
        lines.append("".join(cells))
    return lines
