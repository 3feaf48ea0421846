"""Deprecated: the trace report's composition moved to :mod:`sparse_lens.report.trace` (kept one
release; importing a name from here warns)."""

from __future__ import annotations

import warnings

from sparse_lens.report import trace as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for names that never existed
    warnings.warn(f"sparse_lens.cli.trace_report.{name} moved to sparse_lens.report.trace.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
