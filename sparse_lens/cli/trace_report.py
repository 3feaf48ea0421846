"""Deprecated: the trace report's composition moved to :mod:`sparse_lens.report.trace` (kept one
release; importing a name from here warns)."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.report import trace as _moved

__getattr__ = forward_to(_moved, "sparse_lens.cli.trace_report")
