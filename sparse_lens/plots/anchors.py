"""Thought-anchor figures: sentence salience with the anchors marked, receiver-head kurtosis."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from sparse_lens.analysis.thought_anchors import ThoughtAnchors
from sparse_lens.plots.save import save_figure


def _pool_max(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Downsample to at most ``bins`` bars (max over each bin, NaN-aware); returns (x, values)."""
    n = len(values)
    if n <= bins:
        return np.arange(n), values
    edges = np.linspace(0, n, bins + 1).astype(int)
    pooled = np.array([np.nanmax(values[a:b]) if np.isfinite(values[a:b]).any() else np.nan
                       for a, b in zip(edges[:-1], edges[1:])])
    return (edges[:-1] + edges[1:] - 1) / 2, pooled


def salience_figure(
    anchors: ThoughtAnchors,
    *,
    sentences: Sequence[str] | None = None,
    k: int = 5,
    reference: ThoughtAnchors | None = None,
    max_bars: int = 400,
    highlight: Sequence[int] = (),
    highlight_label: str = "highlighted",
    title: str = "",
) -> Figure:
    """Bars of sentence salience (mean vertical score over the receiver heads) with the top-``k``
    anchors in red and labelled (with their text if ``sentences`` is given). ``reference`` (e.g. the
    dense result) is drawn as dots. Above ``max_bars`` sentences, bars are max-pooled.
    ``highlight``: sentences (e.g. a needle) drawn in orange, with a triangle above them."""
    salience = anchors.salience.float().numpy()
    x, bars = _pool_max(salience, max_bars)
    top = anchors.anchors(k)
    fig = Figure(figsize=(min(16, 4 + 0.12 * len(bars)), 4.2))
    ax = fig.subplots()
    ax.bar(x, np.nan_to_num(bars), width=max(1.0, len(salience) / len(bars)) * 0.85, color="#8da0cb",
           label=f"salience ({anchors.method})")
    ax.bar(top, salience[top], width=0.85, color="#d62728", label=f"top-{len(top)} anchors")
    marked = [int(i) for i in highlight if 0 <= int(i) < len(salience)]
    if marked:
        heights = np.nan_to_num(salience[marked])
        ax.bar(marked, heights, width=0.85, color="#ff7f0e")
        lift = 0.04 * float(np.nanmax(salience)) if np.isfinite(salience).any() else 0.0
        ax.scatter(marked, heights + lift, marker="v", s=40, color="#ff7f0e", edgecolors="k", linewidths=0.5, zorder=5,
                   label=highlight_label)
    if reference is not None:
        ref_x, ref = _pool_max(reference.salience.float().numpy(), max_bars)
        ax.plot(ref_x, ref, "k.", markersize=4, label=f"salience ({reference.method})")
    for rank, index in enumerate(top):
        label = f"{index}" + (f": {sentences[index][:40]}" if sentences is not None else "")
        ax.annotate(label, (index, salience[index]), xytext=(0, 4 + 11 * rank), textcoords="offset points",
                    ha="center", fontsize=7, color="#d62728", arrowprops=dict(arrowstyle="-", color="#d62728", lw=0.4))
    finite = salience[np.isfinite(salience)]
    if finite.size:
        ax.set_ylim(0, float(finite.max()) * (1.25 + 0.08 * len(top)))
    ax.set_xlabel("sentence")
    ax.set_ylabel("mean vertical score over receiver heads")
    ax.set_title(title or f"Thought anchors: {anchors.n_sentences} sentences, {len(anchors.receiver_heads)} receiver heads")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def plot_salience(anchors: ThoughtAnchors, path: str | Path, **options: Any) -> Path:
    """:func:`salience_figure` (same keyword options), saved to ``path`` (returned)."""
    return save_figure(salience_figure(anchors, **options), path)


def receiver_kurtosis_figure(anchors: ThoughtAnchors, title: str = "") -> Figure:
    """Heatmap layers x heads of the kurtosis of each head's vertical scores; receiver heads boxed."""
    kurt = anchors.kurtosis.float()
    layers, heads = kurt.shape
    fig = Figure(figsize=(max(4, 0.45 * heads + 2), max(3, 0.25 * layers + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(kurt.numpy(), aspect="auto", cmap="magma")
    if anchors.receiver_heads:
        layer_ids, head_ids = zip(*anchors.receiver_heads)
        ax.scatter(head_ids, layer_ids, marker="s", s=40, facecolors="none", edgecolors="cyan", linewidths=1.0,
                   label="receiver heads")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Kurtosis of vertical scores ({anchors.method})")
    fig.colorbar(image, ax=ax, label="Fisher kurtosis")
    fig.tight_layout()
    return fig


def plot_receiver_kurtosis(anchors: ThoughtAnchors, path: str | Path, title: str = "") -> Path:
    """:func:`receiver_kurtosis_figure`, saved to ``path`` (returned)."""
    return save_figure(receiver_kurtosis_figure(anchors, title=title), path)
