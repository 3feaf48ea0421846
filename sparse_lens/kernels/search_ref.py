"""Deprecated path (one release): the hierarchical block search and its branch scores moved to :mod:`sparse_lens.kernels.search`;
importing a name from here warns and forwards."""

from __future__ import annotations

import warnings

from sparse_lens.kernels import search as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.kernels.search_ref.{name} moved to sparse_lens.kernels.search.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
