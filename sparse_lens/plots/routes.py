"""Route graph figure: layers on the x axis, query-block position on the y axis."""

from __future__ import annotations

from pathlib import Path

from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from sparse_lens.analysis.routes import Route, RoutePath
from sparse_lens.plots.save import save_figure


def _segments(route: Route, path: RoutePath) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Each step as a segment from (layer, query block) to (layer - 1, the node it lands on)."""
    return [((step.layer, step.query_block), (step.layer - 1, step.key_block * route.key_block // route.query_block))
            for step in path.steps]


def route_figure(route: Route, *, max_edges: int = 3000, title: str = "") -> Figure:
    """The edges on the best routes (grey, width and opacity by mass; ``route.edges``, at most
    ``max_edges`` of them: those with the highest log-mass of a complete route through them), the
    best path (blue), the three best complete routes through the needle (orange, dashed; a star on
    each entry edge) and the needle's blocks (shaded band). An edge of layer l joins (l, query
    block) to (l - 1, the block it reads); layer -1 stands for the input tokens."""
    fig = Figure(figsize=(max(7, 0.3 * route.n_layers + 4.5), 5))
    ax = fig.subplots()
    needle_nodes = route.needle_node_blocks()
    ax.axhspan(min(needle_nodes) - 0.5, max(needle_nodes) + 0.5, color="#ffd92f", alpha=0.35, lw=0, label="needle blocks")
    edges = list(route.edges[:max_edges])
    if edges:
        top = max(edge[3] for edge in edges) or 1.0
        segments = [((layer, q), (layer - 1, block * route.key_block // route.query_block)) for layer, q, block, _ in edges]
        widths = [0.3 + 2.0 * weight / top for *_, weight in edges]
        colors = [(0.4, 0.4, 0.4, 0.08 + 0.5 * weight / top) for *_, weight in edges]
        ax.add_collection(LineCollection(segments, linewidths=widths, colors=colors, zorder=1))
    if route.best is not None:
        for (x0, y0), (x1, y1) in _segments(route, route.best):
            ax.plot([x0, x1], [y0, y1], color="#1f77b4", lw=3.0, alpha=0.9, zorder=3)
    for index, entry_path in enumerate(route.needle_entries[:3]):
        for (x0, y0), (x1, y1) in _segments(route, entry_path):
            ax.plot([x0, x1], [y0, y1], color="#ff7f0e", lw=1.5, alpha=0.8, zorder=4, ls="--")
        step = entry_path.needle_entry
        landing = step.key_block * route.key_block // route.query_block
        ax.scatter([step.layer - 0.5], [(step.query_block + landing) / 2], marker="*", s=160, color="#ff7f0e", edgecolors="k", zorder=5,
                   label="needle entry" if index == 0 else None)
    ax.scatter([route.n_layers - 1], [route.answer_block], marker="o", s=60, color="#d62728", zorder=5, label="answer block")
    ax.plot([], [], color="#1f77b4", lw=3, label="best path")
    ax.set_xlim(-1.5, route.n_layers - 0.5)
    ax.set_ylim(-0.5, route.n_query_blocks - 0.5)
    ax.set_xlabel("layer (-1 = input tokens)")
    ax.set_ylabel(f"query block ({route.query_block} tokens)")
    ax.set_title(title or f"Exact routes from position {route.answer_position} to the needle")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, framealpha=0.7)
    fig.tight_layout()
    return fig


def plot_route(route: Route, path: str | Path, *, max_edges: int = 3000, title: str = "") -> Path:
    """:func:`route_figure`, saved to ``path`` (returned)."""
    return save_figure(route_figure(route, max_edges=max_edges, title=title), path)
