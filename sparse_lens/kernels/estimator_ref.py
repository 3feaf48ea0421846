"""Deprecated path (one release): the Stream estimator (torch) moved to :mod:`sparse_lens.kernels.stream`;
importing a name from here warns and forwards."""

from __future__ import annotations

import warnings

from sparse_lens.kernels import stream as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.kernels.estimator_ref.{name} moved to sparse_lens.kernels.stream.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
