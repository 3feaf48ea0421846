"""Deprecated module path: the fidelity metrics live in :mod:`sparse_lens.analysis.fidelity_metrics`.

``sparse_lens.analysis.fidelity`` is the *function* (``sl.fidelity``); the module of the same
name was shadowed by it (``import sparse_lens.analysis.fidelity as m`` gave the function). This
shim keeps ``from sparse_lens.analysis.fidelity import collect_dense`` (and every other name)
working for one release, with a ``DeprecationWarning`` naming the new module.
"""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.analysis import fidelity_metrics as _moved

__getattr__ = forward_to(_moved, "sparse_lens.analysis.fidelity",
                         " (sparse_lens.analysis.fidelity is the function sl.fidelity)")
