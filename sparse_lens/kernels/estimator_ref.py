"""Deprecated path (one release): the Stream estimator (torch) moved to :mod:`sparse_lens.kernels.stream`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import stream as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.estimator_ref")
