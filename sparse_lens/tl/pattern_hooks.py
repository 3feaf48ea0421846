"""The three block-level hooks of a sparse attention layer, and how their edits enter the model.

In a prefill (``mode="sparse"`` or ``"observe"``), each ``SparseAttentionBridge`` fires, in order:

1. ``hook_block_indices``: int64 [batch, head, n_query_blocks, top_k], the estimator's selection,
   **before** attention runs. An edit (a returned tensor or an in-place change) replaces the
   selection: it is validated (:func:`~sparse_lens.pattern_edits.normalize_block_indices`: sorted,
   ``-1`` last, range, duplicates, causality, no starved query) and attention runs once, over it.
2. ``hook_block_mass``: float32, same shape, the mass each kept block receives (sparse softmax in
   sparse mode, dense mass in observe mode), **after** attention. An edit becomes a block gate
   ``edited / original`` (:func:`~sparse_lens.pattern_edits.gate_from_mass_edit`) and the layer
   recomputes its output with it, so each block carries the edited mass.
3. ``hook_pattern``: the :class:`~sparse_lens.pattern.BlockSparsePattern` built from the (edited)
   indices, mass and gate. An edit of ``block_indices`` or ``block_gate`` (a new pattern or an
   in-place change) is validated like 1. and the layer recomputes over it; an edit of
   ``block_mass`` alone acts like 2. (composed with the gate already there).

Edits compose in that order: each hook sees the result of the edits before it. Edits are detected
by content (a hook returning an equal copy edits nothing), so in-place edits, as
``transformer_lens.patching`` makes on tensor hooks, count. In observe mode every edit raises
``ObserveModeEditError``. Edits cost one extra attention pass (2. and 3.) or nothing (1.).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidPatternError, ObserveModeEditError
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.pattern_edits import gate_from_mass_edit, normalize_block_indices


def _has_hooks(hook_point: Any) -> bool:
    return bool(getattr(hook_point, "_forward_hooks", None))


def _changed(before: Tensor | None, after: Tensor | None) -> bool:
    if before is None or after is None:
        return before is not after
    return before.shape != after.shape or before.dtype != after.dtype or not torch.equal(before, after)


def _refuse_in_observe(mode: str, layer: str, hook: str) -> None:
    if mode == "observe":
        raise ObserveModeEditError(
            f"{layer}: a {hook} hook edited the selection in observe mode, where the model runs dense "
            "attention; switch to mode='sparse' to run on an edited pattern."
        )


def fire_block_indices(
    hook_point: Any,
    block_indices: Int[Tensor, "batch head n_query_blocks top_k"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    mode: str,
    layer: str,
) -> Int[Tensor, "batch head n_query_blocks top_k"]:
    """Fire ``hook_block_indices``; return the selection attention should run on (validated if edited)."""
    if not _has_hooks(hook_point):
        return hook_point(block_indices)
    before = block_indices.clone()
    after = hook_point(block_indices)
    if not isinstance(after, Tensor):
        raise InvalidPatternError(f"{layer}: a hook_block_indices hook returned {type(after).__name__}, not a tensor.")
    if not _changed(before, after):
        return before
    _refuse_in_observe(mode, layer, "hook_block_indices")
    if tuple(after.shape[:3]) != tuple(before.shape[:3]):
        raise InvalidPatternError(
            f"{layer}: an edited block_indices must keep [batch, head, n_query_blocks] = {list(before.shape[:3])}, "
            f"got {list(after.shape)} (top_k may change)."
        )
    indices, _ = normalize_block_indices(
        after.to(torch.int64), seq_len=seq_len, query_block=query_block, key_block=key_block
    )
    return indices


def fire_block_mass(
    hook_point: Any, block_mass: Float[Tensor, "batch head n_query_blocks top_k"], *, mode: str, layer: str,
) -> Float[Tensor, "batch head n_query_blocks top_k"] | None:
    """Fire ``hook_block_mass``; return the block gate an edit asks for, or ``None`` if unedited."""
    if not _has_hooks(hook_point):
        hook_point(block_mass)
        return None
    before = block_mass.detach().clone()
    after = hook_point(block_mass)
    if not isinstance(after, Tensor):
        raise InvalidPatternError(f"{layer}: a hook_block_mass hook returned {type(after).__name__}, not a tensor.")
    if not _changed(before, after):
        return None
    _refuse_in_observe(mode, layer, "hook_block_mass")
    return gate_from_mass_edit(before, after)


def fire_pattern(hook_point: Any, pattern: BlockSparsePattern, *, layer: str) -> BlockSparsePattern | None:
    """Fire ``hook_pattern``; return the validated edited pattern to recompute over, or ``None``."""
    if not _has_hooks(hook_point):
        hook_point(pattern)
        return None
    before = [None if t is None else t.detach().clone() for t in (pattern.block_indices, pattern.block_mass,
                                                                     pattern.block_gate)]
    hooked = hook_point(pattern)
    if not isinstance(hooked, BlockSparsePattern):
        raise InvalidPatternError(
            f"{layer}: a hook_pattern hook returned {type(hooked).__name__}; it must return a BlockSparsePattern "
            "(pattern.with_block_indices(...), pattern.with_gate(...)) or None."
        )
    indices_changed = _changed(before[0], hooked.block_indices) if hooked.has_batch_dim else True
    mass_changed = hooked.has_batch_dim and _changed(before[1], hooked.block_mass)
    gate_changed = _changed(before[2], hooked.block_gate) if hooked.has_batch_dim else True
    if not (indices_changed or mass_changed or gate_changed):
        return None
    _refuse_in_observe(pattern.mode, layer, "hook_pattern")
    geometry = ("seq_len", "query_block", "key_block", "scale", "first_query_block", "has_batch_dim")
    changed_geometry = [name for name in geometry if getattr(hooked, name) != getattr(pattern, name)]
    if changed_geometry or hooked.block_indices.shape[:3] != pattern.block_indices.shape[:3]:
        raise InvalidPatternError(
            f"{layer}: an edited pattern must keep the layer's geometry (whole, batched, same blocks and rows); "
            f"changed: {changed_geometry or ['block_indices shape']}. Edit block_indices / block_gate only."
        )
    if mass_changed and not indices_changed:
        gate = gate_from_mass_edit(before[1], hooked.block_mass)
        hooked = hooked.with_gate(gate if hooked.block_gate is None else gate * hooked.block_gate)
    return hooked.validated()
