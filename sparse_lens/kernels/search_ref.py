"""Deprecated path (one release): the hierarchical block search and its branch scores moved to :mod:`sparse_lens.kernels.search`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import search as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.search_ref")
