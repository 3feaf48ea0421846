"""Deprecated path (one release): block-sparse attention (torch) moved to :mod:`sparse_lens.kernels.sparse_attention`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import sparse_attention as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.sparse_attention_ref")
