"""Deprecated module path: the fidelity metrics live in :mod:`sparse_lens.analysis.fidelity_metrics`.

``sparse_lens.analysis.fidelity`` is the *function* (``sl.fidelity``); the module of the same
name was shadowed by it (``import sparse_lens.analysis.fidelity as m`` gave the function). This
shim keeps ``from sparse_lens.analysis.fidelity import collect_dense`` (and every other name)
working for one release, with a ``DeprecationWarning`` naming the new module.
"""

from __future__ import annotations

import warnings

from sparse_lens.analysis import fidelity_metrics as _metrics


def __getattr__(name: str):
    value = getattr(_metrics, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.analysis.fidelity.{name} moved to sparse_lens.analysis.fidelity_metrics.{name} "
                  "(sparse_lens.analysis.fidelity is the function sl.fidelity)", DeprecationWarning, stacklevel=2)
    return value
