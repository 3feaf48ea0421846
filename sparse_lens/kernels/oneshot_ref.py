"""Deprecated path (one release): the one-shot baselines moved to :mod:`sparse_lens.kernels.oneshot`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import oneshot as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.oneshot_ref")
