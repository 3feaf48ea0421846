"""FlexAttention's vocabulary on a :class:`~sparse_lens.pattern.BlockSparsePattern`: ``BLOCK_SIZE``,
``kv_num_blocks``, ``kv_indices``, ``to_block_mask()`` and ``to_string()`` (the export and the grid
themselves are in :mod:`sparse_lens.pattern_flex`). Mixed into ``BlockSparsePattern``; it uses that
dataclass's fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from sparse_lens.errors import ContextTooLongError
from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.pattern_flex import DEFAULT_BLOCK_MASK_BYTES, block_grid, block_mask_from_indices

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class PatternFlexVocabulary:
    """``BlockSparsePattern`` in FlexAttention's ``BlockMask`` terms (see the module docstring)."""

    @property
    def BLOCK_SIZE(self) -> tuple[int, int]:  # noqa: N802 (FlexAttention's name)
        """``(query_block, key_block)`` in tokens, as ``BlockMask.BLOCK_SIZE``."""
        return (self.query_block, self.key_block)

    @property
    def kv_num_blocks(self) -> Int[Tensor, "batch head n_query_blocks"]:
        """int32 [batch, head, n_query_blocks]: kept key blocks per query block (used slots)."""
        return (self.block_indices >= 0).sum(-1).to(torch.int32)

    @property
    def kv_indices(self) -> Int[Tensor, "batch head n_query_blocks top_k"]:
        """int32 [batch, head, n_query_blocks, top_k]: the compact kept-block list, ascending; only
        the first ``kv_num_blocks`` entries of a row are used (the rest are ``-1``). FlexAttention's
        own ``BlockMask.kv_indices`` is ``[.., Q_BLOCKS, KV_BLOCKS]`` (see :meth:`to_block_mask`)."""
        return self.block_indices.to(torch.int32)

    def to_block_mask(self, max_bytes: int = DEFAULT_BLOCK_MASK_BYTES) -> "BlockMask":
        """A ``torch.nn.attention.flex_attention.BlockMask`` keeping exactly these blocks.

        Kept blocks are partial blocks with a causal ``mask_mod``, so
        ``flex_attention(q, k, v, block_mask=pattern.to_block_mask(), scale=pattern.scale,
        enable_gqa=True)`` reproduces sparse mode's attention (ungated). Its index tables are
        ``[batch, head, Q_BLOCKS, KV_BLOCKS]`` int32 (and the transpose): quadratic in the number
        of blocks.

        Raises:
            ContextTooLongError: those tables would need more than ``max_bytes``.
            IncompletePatternError: the pattern was sliced along queries.
        """
        self.require_whole("to_block_mask")
        return block_mask_from_indices(
            self._batched().block_indices, seq_len=self.seq_len, query_block=self.query_block,
            key_block=self.key_block, max_bytes=max_bytes,
        )

    def to_string(self, limit: int = 4, max_blocks: int = 128) -> str:
        """A readable grid per (batch, head), as ``BlockMask.to_string``: one line per query block,
        ``█`` kept key block, ``░`` causal but pruned, blank not causal. At most ``limit`` heads;
        refused (``ContextTooLongError``) beyond ``max_blocks`` blocks per side."""
        n_key_blocks = num_blocks(self.seq_len, self.key_block)
        if max(self.n_query_blocks, n_key_blocks) > max_blocks:
            raise ContextTooLongError(
                f"to_string draws {self.n_query_blocks} x {n_key_blocks} blocks; the limit is max_blocks={max_blocks}."
            )
        self.require_whole("to_string")
        indices = self._batched().block_indices
        parts = [f"{self!r}  (█ kept, ░ pruned, blank not causal)"]
        for flat, (batch, head) in enumerate((b, h) for b in range(indices.shape[0]) for h in range(indices.shape[1])):
            if flat == limit:
                parts.append(f"... {indices.shape[0] * indices.shape[1] - limit} more (batch, head) pairs")
                break
            parts.append(f"batch {batch}, head {head}:" if self.has_batch_dim else f"head {head}:")
            parts += block_grid(indices[batch, head], seq_len=self.seq_len, query_block=self.query_block,
                                key_block=self.key_block)
        return "\n".join(parts)

