"""Recall per layer: one line per figure over the layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sparse_lens.plots.save import save_figure

# key in a per-layer row -> (legend label, colour, line style)
LAYER_SERIES = {
    "mass_recall_mean": ("mass recall (mean over query blocks)", "#1f77b4", "-"),
    "oracle_recall_mean": ("oracle recall (exact top-k blocks)", "#7f7f7f", "--"),
    "needle_heads_kept": ("heads keeping a needle block at the answer", "#d62728", "-"),
    "needle_mass": ("answer's mass on the needle (mean over heads)", "#ff7f0e", ":"),
    "pruned_fraction": ("pruned fraction", "#2ca02c", "-."),
}


def _series(layers: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    values = [row.get(key) for row in layers]
    if all(value is None for value in values):
        return None
    return np.array([np.nan if value is None else float(value) for value in values])


def layer_recall_figure(layers: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """Lines over layers of whichever of these keys the per-layer rows hold (None = not measured):
    ``mass_recall_mean`` (with the band down to ``mass_recall_p5``), ``oracle_recall_mean``,
    ``needle_heads_kept``, ``needle_mass`` and ``pruned_fraction``, all in [0, 1]. Rows are dicts
    with a ``layer`` key, as ``sl.fidelity(..., per_layer=True)["layers"]`` gives (merged with
    needle figures by ``sparse-lens trace``)."""
    if not layers:
        raise ValueError("No layers to plot.")
    x = np.array([row.get("layer", index) for index, row in enumerate(layers)])
    fig = Figure(figsize=(max(6, 0.22 * len(layers) + 3.5), 4))
    ax = fig.subplots()
    recall, p5 = _series(layers, "mass_recall_mean"), _series(layers, "mass_recall_p5")
    if recall is not None and p5 is not None:
        ax.fill_between(x, p5, recall, color="#1f77b4", alpha=0.15, lw=0, label="mass recall, p5 to mean")
    for key, (label, color, style) in LAYER_SERIES.items():
        values = _series(layers, key)
        if values is not None:
            ax.plot(x, values, color=color, ls=style, marker="o", markersize=3, lw=1.4, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Recall per layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, framealpha=0.7)
    fig.tight_layout()
    return fig


def plot_layer_recall(layers: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """:func:`layer_recall_figure`, saved to ``path`` (returned)."""
    return save_figure(layer_recall_figure(layers, title=title), path)
