"""Matplotlib figures of sparse traces; none serialises a T x T array.

Each ``*_figure`` function builds and returns a ``matplotlib.figure.Figure`` without touching
pyplot or the session's backend (a notebook shows it inline); :func:`save_figure` writes one.
Each ``plot_*`` function is its ``*_figure`` saved to a path, and returns the path.
"""

from sparse_lens.plots.anchors import plot_receiver_kurtosis, plot_salience, receiver_kurtosis_figure, salience_figure
from sparse_lens.plots.blocks import BlockGrid, block_grid, block_heatmap_figure, plot_block_heatmap
from sparse_lens.plots.layers import layer_recall_figure, plot_layer_recall
from sparse_lens.plots.needle import needle_recall_figure, plot_needle_recall
from sparse_lens.plots.routes import plot_route, route_figure
from sparse_lens.plots.save import figure_png, save_figure

__all__ = [
    "BlockGrid",
    "block_grid",
    "block_heatmap_figure",
    "figure_png",
    "layer_recall_figure",
    "needle_recall_figure",
    "plot_block_heatmap",
    "plot_layer_recall",
    "plot_needle_recall",
    "plot_receiver_kurtosis",
    "plot_route",
    "plot_salience",
    "receiver_kurtosis_figure",
    "route_figure",
    "salience_figure",
    "save_figure",
]
