"""Matplotlib figures of sparse traces, written to files; none serialises a T x T array."""

import matplotlib

matplotlib.use("Agg")

from sparse_lens.plots.needle import plot_needle_recall  # noqa: E402

__all__ = ["plot_needle_recall"]
