"""Recall per layer: lines from per-layer rows, unmeasured figures left out."""

import pytest

from sparse_lens.plots import plot_layer_recall
from sparse_lens.plots.layers import _series


def test_plots_measured_and_unmeasured_rows(tmp_path):
    rows = [{"layer": layer, "pruned_fraction": 0.6, "mass_recall_mean": 0.8 - 0.01 * layer,
             "mass_recall_p5": 0.4, "oracle_recall_mean": 0.9, "needle_heads_kept": layer / 4, "needle_mass": None}
            for layer in range(4)]
    path = plot_layer_recall(rows, tmp_path / "layers.png", title="four layers")
    assert path.stat().st_size > 5000
    # Fidelity skipped: only needle figures, recall None everywhere.
    skipped = [{"layer": row["layer"], "mass_recall_mean": None, "needle_heads_kept": row["needle_heads_kept"]}
               for row in rows]
    assert plot_layer_recall(skipped, tmp_path / "skipped.png").stat().st_size > 5000


def test_series_turns_missing_values_into_gaps():
    rows = [{"a": 0.5}, {"a": None}, {}]
    assert _series(rows, "b") is None
    values = _series(rows, "a")
    assert values[0] == 0.5 and values[1] != values[1] and values[2] != values[2]  # NaN gaps


def test_no_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        plot_layer_recall([], tmp_path / "none.png")
