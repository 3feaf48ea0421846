"""Validation of edited block selections: what a ``hook_pattern`` / ``hook_block_indices`` /
``hook_block_mass`` hook may return.

Checked once, where an edit enters the model (``SparseAttentionBridge``), and on demand through
``BlockSparsePattern.validated()``. All checks are vectorised, O(batch x head x n_query_blocks x
top_k); the offending slot is located only when a check fails.

Rules for an edited ``block_indices`` row (one query block of one head):

- any order: rows are **sorted** ascending, ``-1`` (unused slot) anywhere is moved to the end,
  and a ``block_gate`` given with the rows is permuted with them;
- every entry is ``-1`` or a key block ``0 .. n_key_blocks - 1`` (else ``InvalidPatternError``,
  never a bare ``IndexError``);
- no key block twice in a row (it would be counted twice in the softmax);
- causal: no block after the last key block the query block sees (``last_query // key_block``);
- no starved query: the first query of the block (``row * query_block``) must see at least one
  kept key, i.e. the smallest kept block must start at or before it. Otherwise that query's
  softmax is empty and its output silently 0. With ``query_block > key_block`` the local window
  covers a block's first query only if ``local_blocks >= query_block // key_block``; a sink block
  (block 0) covers every query.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidPatternError
from sparse_lens.kernels.blocks import UNUSED_SLOT, num_blocks


def _first_slot(mask: Tensor) -> tuple[int, ...]:
    """Index of the first True entry, for error messages."""
    return tuple(int(i) for i in mask.nonzero()[0])


def _where(slot: tuple[int, ...], first_query_block: int) -> str:
    """``batch b, head h, query block r`` for a slot of a [batch, head, row, top_k] tensor."""
    batch, head, row = slot[:3]
    return f"batch {batch}, head {head}, query block {row + first_query_block}"


def normalize_block_indices(
    block_indices: Int[Tensor, "batch head n_query_blocks top_k"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    first_query_block: int = 0,
    block_gate: Float[Tensor, "batch head n_query_blocks top_k"] | None = None,
) -> tuple[Int[Tensor, "batch head n_query_blocks top_k"], Float[Tensor, "batch head n_query_blocks top_k"] | None]:
    """Check an edited block selection and return it sorted (``-1`` last), with its gate permuted alike.

    Args:
        block_indices: integer [batch, head, n_query_blocks, top_k]; kept key blocks in any order,
            ``-1`` for unused slots anywhere in the row. Rows are query blocks
            ``first_query_block, first_query_block + 1, ...``.
        seq_len, query_block, key_block: the layer's geometry (tokens).
        block_gate: optional float gate per slot, same shape, permuted with the rows.

    Returns:
        ``(block_indices, block_gate)``: rows ascending, unused slots at the end, same dtype.

    Raises:
        InvalidPatternError: wrong rank or dtype, a block out of range, a repeated block, a
            non-causal block, or a query block whose first query sees no kept key.
    """
    if block_indices.dim() != 4:
        raise InvalidPatternError(
            f"block_indices must be [batch, head, n_query_blocks, top_k], got shape {tuple(block_indices.shape)}."
        )
    if block_indices.is_floating_point() or block_indices.dtype == torch.bool or block_indices.is_complex():
        raise InvalidPatternError(f"block_indices must be an integer tensor, got {block_indices.dtype}.")
    if block_gate is not None and block_gate.shape != block_indices.shape:
        raise InvalidPatternError(
            f"block_gate {tuple(block_gate.shape)} must have the shape of block_indices {tuple(block_indices.shape)}."
        )
    n_key_blocks = num_blocks(seq_len, key_block)
    out_of_range = (block_indices < UNUSED_SLOT) | (block_indices >= n_key_blocks)
    if out_of_range.any():
        slot = _first_slot(out_of_range)
        raise InvalidPatternError(
            f"key block {int(block_indices[slot])} at {_where(slot, first_query_block)}, slot {slot[3]} is out of "
            f"range: a {seq_len}-token sequence has key blocks 0..{n_key_blocks - 1}; -1 marks an unused slot."
        )

    # Sort ascending with unused slots last; carry the gate along.
    big = torch.iinfo(block_indices.dtype).max
    keyed = torch.where(block_indices < 0, torch.full_like(block_indices, big), block_indices)
    keyed, order = keyed.sort(dim=-1, stable=True)
    indices = torch.where(keyed == big, torch.full_like(keyed, UNUSED_SLOT), keyed)
    gate = None if block_gate is None else block_gate.gather(-1, order)

    repeated = (indices[..., 1:] == indices[..., :-1]) & (indices[..., 1:] >= 0)
    if repeated.any():
        slot = _first_slot(repeated)
        raise InvalidPatternError(
            f"key block {int(indices[slot[:3] + (slot[3] + 1,)])} is listed twice at {_where(slot, first_query_block)}; "
            "each kept block may appear once in a row (mark dropped slots with -1)."
        )

    rows = torch.arange(indices.shape[2], device=indices.device) + first_query_block
    first_query = rows * query_block
    last_query = torch.clamp(first_query + query_block, max=seq_len) - 1
    horizon = last_query // key_block  # the last key block each query block sees
    future = indices > horizon[:, None]
    if future.any():
        slot = _first_slot(future)
        row = slot[2] + first_query_block
        raise InvalidPatternError(
            f"key block {int(indices[slot])} at {_where(slot, first_query_block)} is not causal: that query block "
            f"(queries {row * query_block}..{int(last_query[slot[2]])}) sees key blocks 0..{int(horizon[slot[2]])} only."
        )

    first_kept = indices[..., 0]
    starved = (first_kept < 0) | (first_kept * key_block > first_query)
    if starved.any():
        slot = _first_slot(starved)
        row = slot[2] + first_query_block
        local_hint = (
            f" With query_block ({query_block}) > key_block ({key_block}) the local window covers a query block's "
            f"first query only if local_blocks >= query_block // key_block ({query_block // key_block})."
            if query_block > key_block else ""
        )
        raise InvalidPatternError(
            f"at {_where(slot, first_query_block)} query {row * query_block} sees no kept key (kept blocks: "
            f"{[int(b) for b in indices[slot] if b >= 0]}), so its attention output would silently be 0. Keep a "
            f"block at or before key block {row * query_block // key_block} (the sink block 0, or the block holding "
            f"that query).{local_hint}"
        )
    return indices, gate


def gate_from_mass_edit(
    original: Float[Tensor, "batch head n_query_blocks top_k"],
    edited: Float[Tensor, "batch head n_query_blocks top_k"],
) -> Float[Tensor, "batch head n_query_blocks top_k"]:
    """The block gate that makes each kept block receive the ``edited`` mass instead of ``original``.

    An edit of ``block_mass`` is carried out as a gate ``edited / original`` on each kept block's
    attention probabilities (``output = sum_b gate_b * P_b @ V_b``): averaged over the query
    block, block ``b`` then carries exactly the edited mass. Slots whose original mass is 0
    (unused slots) must stay 0 and get gate 1.

    Raises:
        InvalidPatternError: shape change, non-finite or negative mass, or mass given to a slot
            whose original mass is 0.
    """
    if edited.shape != original.shape:
        raise InvalidPatternError(
            f"an edited block_mass must keep its shape {tuple(original.shape)}, got {tuple(edited.shape)}; "
            "to change which blocks are kept, edit hook_block_indices."
        )
    edited = edited.to(original.dtype)
    if not torch.isfinite(edited).all() or (edited < 0).any():
        raise InvalidPatternError("an edited block_mass must be finite and >= 0.")
    empty = original <= 0
    if (empty & (edited != 0)).any():
        slot = _first_slot(empty & (edited != 0))
        raise InvalidPatternError(
            f"block_mass at {_where(slot, 0)}, slot {slot[3]} was 0 (an unused slot or an unreachable block) and "
            "cannot be given mass by scaling; keep another block through hook_block_indices instead."
        )
    return torch.where(empty, torch.ones_like(original), edited / torch.where(empty, torch.ones_like(original), original))
