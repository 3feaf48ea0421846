"""Deprecated path (one release): the rescored and adaptive estimators moved to :mod:`sparse_lens.kernels.rescore`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import rescore as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.rescore_ref")
