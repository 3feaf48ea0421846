"""Deprecated path (one release): block-sparse attention (torch) moved to :mod:`sparse_lens.kernels.sparse_attention`;
importing a name from here warns and forwards."""

from __future__ import annotations

import warnings

from sparse_lens.kernels import sparse_attention as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.kernels.sparse_attention_ref.{name} moved to sparse_lens.kernels.sparse_attention.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
