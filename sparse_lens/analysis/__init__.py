"""Analyses on sparse traces: fidelity against dense attention (more to come: routes, anchors)."""

from sparse_lens.analysis.fidelity import DenseTrace, collect_dense, fidelity

__all__ = ["DenseTrace", "collect_dense", "fidelity"]
