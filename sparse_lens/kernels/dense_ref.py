"""Deprecated path (one release): chunked dense attention with its lse (torch) moved to :mod:`sparse_lens.kernels.dense`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import dense as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.dense_ref")
