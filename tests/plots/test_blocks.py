"""Per-head block heatmaps: the pooled grid against a brute-force one, and no T x T allocation."""

import tracemalloc

import numpy as np
import pytest
import torch

import sparse_lens as sl
from sparse_lens.plots import block_grid, plot_block_heatmap
from tests.tl.test_no_quadratic_tensor import LargestTensor


def random_pattern(seq_len: int, block: int, top_k: int, heads: int = 2, seed: int = 0) -> sl.BlockSparsePattern:
    """Ascending distinct kept blocks per row (fewer, padded with -1, where a row sees fewer)."""
    generator = torch.Generator().manual_seed(seed)
    n_rows = -(-seq_len // block)
    rows = torch.arange(n_rows)[:, None]
    picks = (torch.rand(heads, n_rows, top_k, generator=generator) * (rows + 1)).long()
    picks[..., 0], picks[..., -1] = 0, rows[:, 0]  # a sink and the diagonal block
    picks = picks.sort(-1).values
    duplicate = torch.cat([torch.zeros_like(picks[..., :1], dtype=torch.bool), picks[..., 1:] == picks[..., :-1]], -1)
    indices = picks.masked_fill(duplicate, -1).sort(-1).values  # -1 first; order does not matter to the grid
    mass = torch.rand(heads, n_rows, top_k, generator=generator).masked_fill(indices < 0, 0)
    mass = mass / mass.sum(-1, keepdim=True)
    return sl.BlockSparsePattern(indices[None], mass[None].float(), torch.zeros(1, heads, seq_len), seq_len,
                                 block, block, scale=1.0)


def brute_force_grid(pattern, head, rows_per_cell, cols_per_cell, pool):
    """The full block x block grid, then pooled; NaN where nothing is kept."""
    n_rows = pattern.n_query_blocks
    n_cols = -(-pattern.seq_len // pattern.key_block)
    full = np.full((n_rows, n_cols), np.nan)
    for row in range(n_rows):
        for slot in range(pattern.top_k):
            block = int(pattern.block_indices[0, head, row, slot])
            if block >= 0:
                full[row, block] = float(pattern.block_mass[0, head, row, slot])
    grid_rows, grid_cols = -(-n_rows // rows_per_cell), -(-n_cols // cols_per_cell)
    out = np.full((grid_rows, grid_cols), np.nan)
    for r in range(grid_rows):
        for c in range(grid_cols):
            cell = full[r * rows_per_cell:(r + 1) * rows_per_cell, c * cols_per_cell:(c + 1) * cols_per_cell]
            if np.isfinite(cell).any():
                out[r, c] = np.nanmax(cell) if pool == "max" else np.nansum(cell) / cell.shape[0]
    return out


@pytest.mark.parametrize("pool", ["max", "sum"])
@pytest.mark.parametrize("max_cells, expected_factor", [(256, 1), (16, 3), (8, 6)])
def test_pooled_grid_matches_brute_force(pool, max_cells, expected_factor):
    pattern = random_pattern(seq_len=700, block=16, top_k=5)  # 44 query and key blocks
    for head in range(2):
        grid = block_grid(pattern, head, max_cells=max_cells, pool=pool)
        assert grid.rows_per_cell == grid.cols_per_cell == expected_factor
        assert max(grid.values.shape) <= max_cells
        expected = brute_force_grid(pattern, head, expected_factor, expected_factor, pool)
        np.testing.assert_allclose(grid.values, expected, rtol=1e-5, equal_nan=True)
    if pool == "sum":  # a pooled row still sums to the mean kept mass of its query blocks (1 in sparse mode)
        np.testing.assert_allclose(np.nansum(grid.values, axis=1), 1.0, rtol=1e-5)


def test_extent_is_in_tokens_and_sliced_patterns_keep_their_rows():
    pattern = random_pattern(seq_len=700, block=16, top_k=5)
    assert block_grid(pattern, 0).extent() == (0.0, 700.0, 700.0, 0.0)
    sliced = pattern[:, :, 320:]  # query blocks 20..43
    grid = block_grid(sliced, 1)
    assert grid.values.shape == (24, 44) and grid.extent() == (0.0, 700.0, 700.0, 320.0)
    np.testing.assert_array_equal(grid.values, block_grid(pattern, 1).values[20:])


def test_heatmap_of_a_million_tokens_never_builds_t_by_t(tmp_path):
    seq_len, block, top_k = 2**20, 64, 8  # dense: 2**40 cells; block grid: 16384 x 16384
    pattern = random_pattern(seq_len, block, top_k, heads=2)
    tracemalloc.start()
    with LargestTensor() as recorder:
        path = plot_block_heatmap(pattern, tmp_path / "blocks.png", key_span=(500_000, 500_040), query_position=-1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    numel, shape, op = recorder.largest
    assert numel <= max(pattern.block_indices.numel(), 256 * 256), f"{op} created a tensor of shape {shape}"
    assert peak < 64 * 2**20, f"plotting peaked at {peak / 2**20:.0f} MiB"  # the block grid alone is 1 GiB
    assert path.stat().st_size > 5000
    grid = block_grid(pattern, 0)
    assert grid.values.shape == (256, 256) and grid.rows_per_cell == grid.cols_per_cell == 64


def test_heatmap_panels_for_chosen_heads(tmp_path):
    pattern = random_pattern(seq_len=300, block=16, top_k=4, heads=3)
    path = plot_block_heatmap(pattern, tmp_path / "h.png", heads=[2], pool="sum", title="one head")
    assert path.stat().st_size > 2000
    with pytest.raises(ValueError):
        plot_block_heatmap(pattern, tmp_path / "none.png", heads=[])
    with pytest.raises(ValueError):
        block_grid(pattern, 0, pool="mean")
