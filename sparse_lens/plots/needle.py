"""Needle recall per layer and head, as a heatmap."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from sparse_lens.analysis.needle import NeedleRecall
from sparse_lens.plots.save import save_figure


def needle_recall_figure(recall: NeedleRecall, title: str = "") -> Figure:
    """Heatmap layers x heads of the mass the answer position puts on the needle's kept blocks
    (0 where no needle block is kept), with kept cells marked."""
    layers, heads = recall.mass.shape
    fig = Figure(figsize=(max(4, 0.45 * heads + 2), max(3, 0.25 * layers + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(recall.mass.numpy(), aspect="auto", cmap="viridis", vmin=0)
    kept_layer, kept_head = recall.kept.nonzero(as_tuple=True)
    ax.scatter(kept_head, kept_layer, marker="s", s=12, facecolors="none", edgecolors="white", linewidths=0.6,
               label="needle block kept")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Needle blocks {list(recall.needle_blocks)} at query block {recall.query_block}")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    fig.colorbar(image, ax=ax, label="attention mass on needle blocks")
    fig.tight_layout()
    return fig


def plot_needle_recall(recall: NeedleRecall, path: str | Path, title: str = "") -> Path:
    """:func:`needle_recall_figure`, saved to ``path`` (returned)."""
    return save_figure(needle_recall_figure(recall, title=title), path)
