"""Deprecated module paths (kept one release): one module-level ``__getattr__`` that forwards to
the module a path moved to, with a ``DeprecationWarning`` naming the new place. Every shim of
the package (``kernels/*_ref.py``, ``kernels/estimator_triton.py``, ``analysis/fidelity.py``,
``cli/trace_report.py``) is its docstring plus ``__getattr__ = forward_to(...)``."""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any, Callable


def forward_to(module: ModuleType, old_path: str, note: str = "") -> Callable[[str], Any]:
    """A module ``__getattr__`` for the deprecated path ``old_path``: ``name`` resolves to
    ``module.name`` (``AttributeError`` for names that never existed) and warns
    ``"{old_path}.{name} moved to {module.__name__}.{name}{note}"``."""

    def __getattr__(name: str) -> Any:
        value = getattr(module, name)
        warnings.warn(f"{old_path}.{name} moved to {module.__name__}.{name}{note}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
