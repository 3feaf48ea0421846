"""The tensor-like protocol of :class:`~sparse_lens.pattern.BlockSparsePattern`: what TransformerLens'
``ActivationCache`` calls on a ``hook_pattern`` value.

``detach``, ``to``, ``cpu``, ``cuda``, ``clone``, ``squeeze(0)`` / ``unsqueeze(0)`` act on every tensor field;
``torch.stack(patterns)`` gives a :class:`~sparse_lens.pattern_stack.BlockSparsePatternStack`. Any
other torch function (``torch.mean(pattern)``), ``torch.Tensor`` method (``pattern.mean()``) or entry
assignment raises ``DensePatternRequiredError`` / ``DensePatternMethodError`` naming what to use
instead. Mixed into ``BlockSparsePattern``; it uses that dataclass's fields.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sparse_lens.errors import DensePatternMethodError, DensePatternRequiredError, InvalidConfigError, ShapeError

if TYPE_CHECKING:
    from sparse_lens.pattern import BlockSparsePattern

# Why a dense-tensor operation is refused (``{what}``), and what to do instead; indexing.py uses it too.
DENSE_ONLY = (
    "A BlockSparsePattern is not a dense [batch, head, query, key] tensor: {what}. This is what "
    "transformer_lens.patching's get_act_patch_attn_head_pattern_* helpers (and generic_activation_patch "
    "on hook_pattern) do; they do not apply to sparse attention (for the *_every helpers, "
    "sparse_lens.tl.patching refuses that sweep before the others run). Instead: patch blocks.{{l}}.attn."
    "hook_block_indices (a plain tensor hook: TL's patching and caching work on it), return "
    "pattern.with_block_indices(...) / pattern.with_gate(...) from a hook_pattern hook, use "
    "sparse_lens.analysis (block_attribution, suppress_span, path_patch), or pattern.token_probs() "
    "for token-level values on short inputs."
)

# Public names of torch.Tensor: read on a pattern (which lacks them) they raise DensePatternMethodError.
_TENSOR_NAMES = frozenset(name for name in dir(Tensor) if not name.startswith("_"))
# Tensor dtype-cast methods, and the pattern.to(...) that does their work on a pattern.
_DTYPE_CASTS = {"float": "torch.float32", "double": "torch.float64", "half": "torch.float16",
                "bfloat16": "torch.bfloat16"}


def _not_a_tensor(what: str, example: str) -> str:
    """The message of ``torch.f(pattern)`` and ``pattern.f()``: ``what`` does not apply, use ``example``."""
    return (f"{what} does not apply to a BlockSparsePattern (block indices and masses, not a dense "
            "[batch, head, query, key] tensor). Use its tensors (pattern.block_mass, pattern.block_indices: "
            f"e.g. {example}), its summaries (recall(), kept_pairs(), pruned_fraction()), "
            "pattern.token_probs(...) for token-level values on short inputs, or torch.stack(patterns).")


class PatternTensorProtocol:
    """``BlockSparsePattern``'s tensor-like methods (see the module docstring)."""

    def _map_tensors(self, fn, batch_axis: bool = False, **other_changes: Any) -> "BlockSparsePattern":
        """Apply ``fn`` to every tensor field; ``batch_axis=True`` (fn acts on the batch axis) skips
        the per-head ``sinks``, which have none."""
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor) and not (batch_axis and f.name == "sinks")
        }
        return replace(self, **changes, **other_changes)

    def detach(self) -> "BlockSparsePattern":
        return self._map_tensors(Tensor.detach)

    def to(self, *args, **kwargs) -> "BlockSparsePattern":
        """Move every tensor (``to(device)``); dtype casts apply to float tensors only."""
        return self._map_tensors(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else t.to(
            *[a for a in args if not isinstance(a, torch.dtype)],
            **{k: v for k, v in kwargs.items() if k != "dtype"},
        ))

    def clone(self) -> "BlockSparsePattern":
        return self._map_tensors(Tensor.clone)

    def cpu(self) -> "BlockSparsePattern":
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None, non_blocking: bool = False) -> "BlockSparsePattern":
        """``to`` a CUDA device, as ``Tensor.cuda``: the current one, or ``device`` (an index,
        ``"cuda:1"``, ``torch.device("cuda", 1)``). Raises ``InvalidConfigError`` for another device type."""
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        if target.type != "cuda":
            raise InvalidConfigError(f"pattern.cuda(device) takes a CUDA device, got {device!r}: "
                                     f"use pattern.to({str(target)!r}) for others.")
        return self.to(target, non_blocking=non_blocking)

    def squeeze(self, dim: int = 0) -> "BlockSparsePattern":
        """Drop a batch axis of size 1 (``dim=0`` only); unchanged otherwise, as ``Tensor.squeeze``."""
        if dim != 0:
            raise DensePatternRequiredError(DENSE_ONLY.format(what=f"only the batch axis squeezes, not dim {dim}"))
        return self[0] if self.has_batch_dim and self.shape[0] == 1 else self

    def unsqueeze(self, dim: int = 0) -> "BlockSparsePattern":
        """Restore the batch axis of a pattern without one (``dim=0`` only)."""
        if dim != 0 or self.has_batch_dim:
            raise ShapeError("unsqueeze(0) restores the batch axis of a pattern without one; nothing else.")
        return self._map_tensors(lambda t: t.unsqueeze(0), batch_axis=True, has_batch_dim=True)

    def _batched(self) -> "BlockSparsePattern":
        return self if self.has_batch_dim else self.unsqueeze(0)

    def __setitem__(self, index, value) -> None:
        raise DensePatternRequiredError(DENSE_ONLY.format(what="its entries cannot be assigned"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.stack(patterns)`` gives a :class:`~sparse_lens.pattern_stack.BlockSparsePatternStack`;
        any other torch function raises ``DensePatternRequiredError`` naming what to use instead."""
        if func is torch.stack:
            from sparse_lens.pattern_stack import stack_patterns

            return stack_patterns(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        raise DensePatternRequiredError(_not_a_tensor(f"torch.{name}", f"torch.{name}(pattern.block_mass)"))

    def __getattr__(self, name: str) -> Any:
        """Only reached for names the pattern lacks: a ``torch.Tensor`` method or attribute
        (``pattern.mean()``, ``pattern.softmax(-1)``) raises ``DensePatternMethodError``, the method
        form of what ``torch.mean(pattern)`` raises (an ``AttributeError`` too, for ``hasattr``);
        any other name a plain ``AttributeError``."""
        if name in _DTYPE_CASTS:
            raise DensePatternMethodError(
                f"pattern.{name}() (a torch.Tensor dtype cast) does not apply to a BlockSparsePattern: cast it with "
                f"pattern.to({_DTYPE_CASTS[name]}) (its float tensors: block_mass, lse, query / key; block_indices "
                f"stay int64), or one tensor with e.g. pattern.block_mass.{name}().")
        if name in _TENSOR_NAMES:
            raise DensePatternMethodError(_not_a_tensor(f"pattern.{name} (a torch.Tensor attribute)",
                                                        f"pattern.block_mass.{name}"))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

