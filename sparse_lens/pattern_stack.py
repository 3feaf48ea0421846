"""Patterns of several layers stacked along a leading layer axis.

``torch.stack([pattern_0, pattern_1, ...])`` and TransformerLens'
``ActivationCache.stack_activation("pattern")`` return a :class:`BlockSparsePatternStack`: the
layers' patterns, with their compact tensors stacked (``block_indices`` [layer, batch, head,
n_query_blocks, top_k], ...). Patterns of different geometry raise ``PatternGeometryError``. As on
one pattern, a ``torch.Tensor`` method (``stack.mean()``) or torch function (``torch.mean(stack)``)
raises ``DensePatternMethodError`` / ``DensePatternRequiredError`` naming what to use instead.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import Tensor

from sparse_lens.errors import DensePatternMethodError, DensePatternRequiredError, PatternGeometryError

if TYPE_CHECKING:
    from sparse_lens.pattern import BlockSparsePattern

_GEOMETRY = ("seq_len", "query_block", "key_block", "mode", "first_query_block", "has_batch_dim")
# Public names of torch.Tensor: read on a stack (which lacks them) they raise DensePatternMethodError.
_TENSOR_NAMES = frozenset(name for name in dir(Tensor) if not name.startswith("_"))


def _not_a_tensor(what: str, example: str) -> str:
    """The message of ``torch.f(stack)`` and ``stack.f()``: ``what`` does not apply, use ``example``."""
    return (f"{what} does not apply to a BlockSparsePatternStack (each layer's block indices and masses, not a "
            "dense [layer, batch, head, query, key] tensor). Use its stacked tensors (stack.block_mass, "
            f"stack.block_indices: e.g. {example}), stack.pruned_fraction(), or a layer's pattern (stack[l]).")


@dataclass(frozen=True, eq=False)
class BlockSparsePatternStack:
    """Patterns of equal geometry with a leading layer axis (``stack[i]`` is layer i's pattern).

    Attributes:
        patterns: the stacked patterns, in order.
    """

    patterns: tuple["BlockSparsePattern", ...]

    def __post_init__(self) -> None:
        if not self.patterns:
            raise PatternGeometryError("Cannot stack an empty list of patterns.")
        from sparse_lens.pattern import BlockSparsePattern

        strangers = [type(p).__name__ for p in self.patterns if not isinstance(p, BlockSparsePattern)]
        if strangers:
            raise PatternGeometryError(f"Only BlockSparsePatterns stack together, got {', '.join(strangers)}.")
        first = self.patterns[0]
        for layer, pattern in enumerate(self.patterns[1:], start=1):
            different = [name for name in _GEOMETRY if getattr(pattern, name) != getattr(first, name)]
            if pattern.block_indices.shape != first.block_indices.shape:
                different.append(f"block_indices shape {tuple(pattern.block_indices.shape)} vs "
                                 f"{tuple(first.block_indices.shape)}")
            if different:
                raise PatternGeometryError(
                    f"pattern {layer} differs from pattern 0 in {', '.join(different)}; only patterns of equal "
                    "geometry stack. Stack their block_indices yourself after padding, or keep them in a list."
                )

    def __len__(self) -> int:
        return len(self.patterns)

    def __iter__(self) -> Iterator["BlockSparsePattern"]:
        return iter(self.patterns)

    def __getitem__(self, index: Any) -> "BlockSparsePattern | BlockSparsePatternStack":
        """``stack[layer]`` is that layer's pattern; ``stack[a:b]`` a stack of those layers; the
        axes after the layer index the patterns (``stack[:, 0]``: every layer's batch row 0,
        ``stack[3, :, :, -1]``: layer 3's last query block), as ``BlockSparsePattern[...]`` does."""
        layer, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        if isinstance(layer, slice):
            return BlockSparsePatternStack(tuple(p[rest] if rest else p for p in self.patterns[layer]))
        whole_number = isinstance(layer, numbers.Integral) or (
            isinstance(layer, Tensor) and layer.dim() == 0 and not layer.is_floating_point())
        if isinstance(layer, bool) or not whole_number or (isinstance(layer, Tensor) and layer.dtype == torch.bool):
            raise IndexError(f"a pattern stack's layer axis takes an int or a slice, got {layer!r}.")
        pattern = self.patterns[int(layer)]
        return pattern[rest] if rest else pattern

    @property
    def shape(self) -> torch.Size:
        """``[layer, *pattern.shape]``: the dense stack this stands for."""
        return torch.Size([len(self.patterns), *self.patterns[0].shape])

    def _stacked(self, name: str) -> Tensor:
        return torch.stack([getattr(pattern, name) for pattern in self.patterns])

    @cached_property
    def block_indices(self) -> Tensor:
        """int64 [layer, (batch,) head, n_query_blocks, top_k]."""
        return self._stacked("block_indices")

    @cached_property
    def block_mass(self) -> Tensor:
        """float [layer, (batch,) head, n_query_blocks, top_k]."""
        return self._stacked("block_mass")

    @cached_property
    def lse(self) -> Tensor:
        """float [layer, (batch,) head, seq]."""
        return self._stacked("lse")

    @property
    def kv_num_blocks(self) -> Tensor:
        """int32 [layer, (batch,) head, n_query_blocks]: used slots per row."""
        return (self.block_indices >= 0).sum(-1).to(torch.int32)

    def pruned_fraction(self) -> Tensor:
        """float64 [layer]: each layer's pruned fraction."""
        return torch.tensor([pattern.pruned_fraction() for pattern in self.patterns], dtype=torch.float64)

    def to(self, *args, **kwargs) -> "BlockSparsePatternStack":
        return BlockSparsePatternStack(tuple(pattern.to(*args, **kwargs) for pattern in self.patterns))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Every torch function raises ``DensePatternRequiredError`` (a ``TypeError``, as before)
        naming what to use instead, as on a single pattern."""
        name = getattr(func, "__name__", str(func))
        raise DensePatternRequiredError(_not_a_tensor(f"torch.{name}", f"torch.{name}(stack.block_mass)"))

    def __getattr__(self, name: str) -> Any:
        """Only reached for names the stack lacks: a ``torch.Tensor`` method or attribute
        (``stack.mean()``) raises ``DensePatternMethodError`` (an ``AttributeError`` too, for
        ``hasattr``); any other name a plain ``AttributeError``."""
        if name in _TENSOR_NAMES:
            raise DensePatternMethodError(_not_a_tensor(f"stack.{name} (a torch.Tensor attribute)",
                                                        f"stack.block_mass.{name}"))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"BlockSparsePatternStack(layers={len(self.patterns)}, {self.patterns[0]!r})"


def stack_patterns(patterns: Sequence["BlockSparsePattern"], dim: int = 0, *, out: None = None) -> BlockSparsePatternStack:
    """``torch.stack`` for patterns: a leading layer axis only (``dim=0``)."""
    if dim != 0 or out is not None:
        raise PatternGeometryError("Patterns stack along a new leading axis only (torch.stack(patterns, dim=0)).")
    return BlockSparsePatternStack(tuple(patterns))
