"""Deprecated path (one release): the rescored and adaptive estimators moved to :mod:`sparse_lens.kernels.rescore`;
importing a name from here warns and forwards."""

from __future__ import annotations

import warnings

from sparse_lens.kernels import rescore as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.kernels.rescore_ref.{name} moved to sparse_lens.kernels.rescore.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
