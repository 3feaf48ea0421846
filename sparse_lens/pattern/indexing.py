"""Indexing a :class:`~sparse_lens.pattern.BlockSparsePattern` as TransformerLens' cache does:
the batch axis (``remove_batch_dim``, ``apply_slice_to_batch_dim``) and the query axis
(``run_with_cache(pos_slice=...)``). Heads and keys are not indexed one by one
(``DensePatternRequiredError``). Mixed into ``BlockSparsePattern``; it uses that dataclass's fields.
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from sparse_lens.errors import DensePatternRequiredError
from sparse_lens.pattern.tensor_protocol import DENSE_ONLY

if TYPE_CHECKING:
    from sparse_lens.pattern import BlockSparsePattern


def _full(selection: Any) -> bool:
    return isinstance(selection, slice) and selection == slice(None)


def _index_tensor(selection: Any, size: int, what: str) -> Int[Tensor, "n"]:
    """int64 indices of an int / sequence of ints / bool mask along an axis of ``size`` entries, as
    torch would read them: ``IndexError`` for an index outside ``[-size, size)``, a non-integer
    index, or a mask of another length (``% size`` or ``int()`` would pick a wrong entry silently)."""
    index = torch.as_tensor(selection)
    if index.numel() == 0:
        return index.to(torch.long).flatten()
    if index.dtype == torch.bool:
        if index.dim() != 1 or index.numel() != size:
            raise IndexError(f"a bool mask over the {what} needs {size} entries, got shape {tuple(index.shape)}.")
        return index.nonzero().flatten()
    if index.is_floating_point() or index.is_complex():
        raise IndexError(f"{what} must be integers, got {index.dtype}.")
    index = index.to(torch.long).flatten()
    if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
        raise IndexError(f"{what} out of range: {index.tolist()[:8]} for an axis of {size}.")
    return index


class PatternIndexing:
    """``BlockSparsePattern[...]``: batch rows and query positions (see the module docstring)."""

    def __getitem__(self, index) -> "BlockSparsePattern":
        """Index the batch axis and/or slice the query axis, as TransformerLens' cache does.

        ``[batch, head, query, key]`` (``[head, query, key]`` without batch dimension). The batch
        selection may be an int (drops the batch axis), a slice or a sequence of ints. The query
        selection is in token positions (an int, a slice, or a sequence of ints, as ``pos_slice``
        gives): the query blocks holding them are kept, which must form one contiguous run
        (``DensePatternRequiredError`` otherwise, e.g. for positions 5 and 900 with 64-token
        blocks). Head and key axes must be ``:`` (``DensePatternRequiredError`` otherwise).
        """
        index = index if isinstance(index, tuple) else (index,)
        if any(sel is Ellipsis for sel in index):
            at = next(i for i, sel in enumerate(index) if sel is Ellipsis)
            index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1:]
        if len(index) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d pattern: {len(index)}")
        index = index + (slice(None),) * (self.ndim - len(index))
        batch_sel = index[0] if self.has_batch_dim else slice(None)
        head_sel, query_sel, key_sel = index[-3:]
        if not _full(head_sel):
            raise DensePatternRequiredError(DENSE_ONLY.format(what="heads are not indexed one by one"))
        if not _full(key_sel):
            raise DensePatternRequiredError(DENSE_ONLY.format(what="its key axis is not indexed"))
        pattern = self
        if not _full(query_sel):
            pattern = pattern._select_queries(query_sel)
        if not _full(batch_sel):
            pattern = pattern._select_batch(batch_sel)
        return pattern

    def _select_batch(self, selection: Any) -> "BlockSparsePattern":
        if isinstance(selection, bool) or (isinstance(selection, Tensor) and selection.dim() == 0
                                           and selection.dtype == torch.bool):
            raise IndexError("a single bool does not index a pattern's batch axis; use a row number or a mask.")
        if isinstance(selection, numbers.Integral) or (isinstance(selection, Tensor) and selection.dim() == 0):
            row = int(selection)
            return self._map_tensors(lambda t: t[row], batch_axis=True, has_batch_dim=False)
        if not isinstance(selection, slice):
            selection = _index_tensor(selection, self.block_indices.shape[0], "batch rows").to(self.device)
        return self._map_tensors(lambda t: t[selection], batch_axis=True)

    def _select_queries(self, query_sel: Any) -> "BlockSparsePattern":
        if isinstance(query_sel, slice):
            positions = list(range(self.seq_len)[query_sel])
        else:  # an int, or a list / array / tensor of ints (TransformerLens' Slice gives arrays), or a bool mask
            positions = [p % self.seq_len for p in _index_tensor(query_sel, self.seq_len, "query positions").tolist()]
        if not positions:
            raise IndexError("Empty query selection.")
        first_pos, last_pos = min(positions), max(positions)
        first_row = first_pos // self.query_block - self.first_query_block
        last_row = last_pos // self.query_block - self.first_query_block
        rows_hit = sorted({position // self.query_block for position in positions})
        if len(rows_hit) != last_row - first_row + 1:  # a pattern holds one contiguous run of query blocks
            shown = ", ".join(map(str, rows_hit[:8])) + (", ..." if len(rows_hit) > 8 else "")
            raise DensePatternRequiredError(
                f"the query positions fall in query blocks {shown}: not one contiguous run, and a pattern holds "
                "one contiguous run of query blocks. Select positions whose blocks touch (e.g. a slice "
                "pattern[:, :, a:b]) or index each run separately.")
        if first_row < 0 or last_row >= self.n_query_blocks:
            raise IndexError("Query positions outside the rows this pattern holds.")
        rows = slice(first_row, last_row + 1)
        return replace(
            self,
            block_indices=self.block_indices[..., rows, :],
            block_mass=self.block_mass[..., rows, :],
            block_gate=None if self.block_gate is None else self.block_gate[..., rows, :],
            first_query_block=self.first_query_block + first_row,
        )
