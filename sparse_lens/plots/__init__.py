"""Matplotlib figures of sparse traces, written to files; none serialises a T x T array."""

import matplotlib

matplotlib.use("Agg")

from sparse_lens.plots.needle import plot_needle_recall  # noqa: E402
from sparse_lens.plots.anchors import plot_receiver_kurtosis, plot_salience  # noqa: E402
from sparse_lens.plots.blocks import BlockGrid, block_grid, plot_block_heatmap  # noqa: E402
from sparse_lens.plots.layers import plot_layer_recall  # noqa: E402
from sparse_lens.plots.routes import plot_route  # noqa: E402

__all__ = [
    "BlockGrid",
    "block_grid",
    "plot_block_heatmap",
    "plot_layer_recall",
    "plot_needle_recall",
    "plot_receiver_kurtosis",
    "plot_route",
    "plot_salience",
]
