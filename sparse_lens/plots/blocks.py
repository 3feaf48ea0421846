"""Per-head block heatmaps of a ``BlockSparsePattern``, pooled onto a small grid.

The kept ``(query block, key block)`` cells are scattered straight from ``block_indices`` and
``block_mass`` into a grid of at most ``max_cells x max_cells`` cells (each cell pools a run of
query blocks and a run of key blocks), so the work and memory are O(n_query_blocks x top_k +
max_cells^2): neither a T x T array nor the full block x block grid is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.plots.save import save_figure

Pool = Literal["max", "sum"]


@dataclass(frozen=True)
class BlockGrid:
    """A pooled block heatmap of one head.

    ``values[r, c]`` covers query blocks ``first_query_block + r * rows_per_cell`` onwards
    (``rows_per_cell`` of them) and key blocks ``c * cols_per_cell`` onwards; NaN where no kept
    block falls in the cell. ``pool="max"``: the largest kept block mass in the cell;
    ``pool="sum"``: the kept mass summed over the cell's key blocks and averaged over its query
    blocks (so a row still sums to the mean kept mass of its query blocks).
    """

    values: np.ndarray
    rows_per_cell: int
    cols_per_cell: int
    first_query_block: int
    query_block: int
    key_block: int
    seq_len: int
    pool: str

    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` in token positions, for ``imshow(extent=...)``."""
        rows, cols = self.values.shape
        top = self.first_query_block * self.query_block
        bottom = min(self.seq_len, (self.first_query_block + rows * self.rows_per_cell) * self.query_block)
        return 0.0, float(min(self.seq_len, cols * self.cols_per_cell * self.key_block)), float(bottom), float(top)


def block_grid(
    pattern: BlockSparsePattern, head: int, *, batch: int = 0, max_cells: int = 256, pool: Pool = "max"
) -> BlockGrid:
    """Pool one head's kept blocks onto a grid of at most ``max_cells`` x ``max_cells`` cells."""
    if pool not in ("max", "sum"):
        raise ValueError(f"pool must be 'max' or 'sum', got {pool!r}.")
    if max_cells < 1:
        raise ValueError("max_cells must be >= 1.")
    indices = pattern.block_indices[batch, head].detach().cpu()  # [rows, top_k]
    mass = pattern.block_mass[batch, head].detach().cpu().float()
    n_rows, n_cols = pattern.n_query_blocks, num_blocks(pattern.seq_len, pattern.key_block)
    rows_per_cell, cols_per_cell = math.ceil(n_rows / max_cells), math.ceil(n_cols / max_cells)
    grid_rows, grid_cols = math.ceil(n_rows / rows_per_cell), math.ceil(n_cols / cols_per_cell)
    used = indices >= 0
    cell_rows = torch.arange(n_rows)[:, None].expand_as(indices)[used] // rows_per_cell
    cells = cell_rows * grid_cols + indices[used] // cols_per_cell
    values = mass[used]
    flat = torch.zeros(grid_rows * grid_cols)
    if pool == "max":
        flat = flat.scatter_reduce(0, cells, values, reduce="amax", include_self=False)
    else:
        rows_in_cell = torch.full((grid_rows,), float(rows_per_cell))
        rows_in_cell[-1] = n_rows - (grid_rows - 1) * rows_per_cell
        flat = flat.index_add(0, cells, values).view(grid_rows, grid_cols).div(rows_in_cell[:, None]).flatten()
    touched = torch.zeros(grid_rows * grid_cols, dtype=torch.bool)
    touched[cells] = True
    flat[~touched] = float("nan")
    return BlockGrid(flat.view(grid_rows, grid_cols).numpy(), rows_per_cell, cols_per_cell,
                     pattern.first_query_block, pattern.query_block, pattern.key_block, pattern.seq_len, pool)


def block_heatmap_figure(
    pattern: BlockSparsePattern,
    *,
    heads: Sequence[int] | None = None,
    batch: int = 0,
    max_cells: int = 256,
    pool: Pool = "max",
    key_span: tuple[int, int] | None = None,
    query_position: int | None = None,
    columns: int = 3,
    title: str = "",
) -> Figure:
    """One panel per head (default: all) of the kept block mass, pooled to at most ``max_cells``
    cells a side (see :class:`BlockGrid`), on a log colour scale; unkept cells are blank. Axes are
    token positions (queries down, keys across). ``key_span`` (e.g. the needle's tokens) is
    marked by dashed vertical lines, ``query_position`` (e.g. the answer) by a horizontal one."""
    heads = list(range(pattern.block_indices.shape[1])) if heads is None else list(heads)
    if not heads:
        raise ValueError("No heads to plot.")
    grids = [block_grid(pattern, head, batch=batch, max_cells=max_cells, pool=pool) for head in heads]
    finite = [grid.values[np.isfinite(grid.values) & (grid.values > 0)] for grid in grids]
    positive = np.concatenate(finite) if finite else np.array([])
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(positive.min()) if positive.size else vmax * 1e-4, vmax * 1e-4)
    vmin = min(vmin, vmax * 0.999)
    columns = max(1, min(columns, len(heads)))
    rows = math.ceil(len(heads) / columns)
    fig = Figure(figsize=(3.2 * columns + 1.2, 3.0 * rows + 0.6))
    axes = fig.subplots(rows, columns, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    image = None
    for ax, head, grid in zip(axes.flat, heads, grids):
        shown = np.where(np.isfinite(grid.values), np.clip(grid.values, vmin, None), np.nan)
        image = ax.imshow(shown, extent=grid.extent(), aspect="auto", interpolation="nearest", cmap=cmap,
                          norm=LogNorm(vmin=vmin, vmax=vmax))
        if key_span is not None:
            for x in key_span:
                ax.axvline(x, color="#d62728", lw=0.7, ls="--")
        if query_position is not None:
            ax.axhline(query_position % pattern.seq_len, color="#ff7f0e", lw=0.7)
        ax.set_title(f"head {head}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("query token", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("key token", fontsize=7)
    grid = grids[0]
    cell = f"{grid.rows_per_cell * grid.query_block} x {grid.cols_per_cell * grid.key_block} tokens per cell"
    fig.suptitle(title or f"Kept block mass ({pool} pooled, {cell})", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"block mass ({pool})", shrink=0.8)
    return fig


def plot_block_heatmap(pattern: BlockSparsePattern, path: str | Path, **options: Any) -> Path:
    """:func:`block_heatmap_figure` (same keyword options), saved to ``path`` (returned)."""
    return save_figure(block_heatmap_figure(pattern, **options), path, dpi=110)
