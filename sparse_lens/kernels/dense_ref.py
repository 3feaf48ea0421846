"""Deprecated path (one release): chunked dense attention with its lse (torch) moved to :mod:`sparse_lens.kernels.dense`;
importing a name from here warns and forwards."""

from __future__ import annotations

import warnings

from sparse_lens.kernels import dense as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.kernels.dense_ref.{name} moved to sparse_lens.kernels.dense.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
