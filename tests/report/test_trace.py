"""The trace report's composition (sparse_lens/report/trace.py); the whole page is tested end to
end through ``sparse-lens trace`` in tests/cli/test_trace.py."""

import pytest
import torch

from sparse_lens.analysis.needle import NeedleRecall
from sparse_lens.report.trace import auto_heatmap_layers, parse_layers, recall_scope


def test_heatmap_layers_argument():
    assert parse_layers("auto", 30) is None
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("none", 3) == []
    assert parse_layers("5,-1,0,5", 30) == [0, 5, 29]
    with pytest.raises(ValueError):
        parse_layers("30", 30)


def test_auto_heatmap_layers_are_the_ends_and_where_the_needle_is_read():
    mass = torch.zeros(12, 4)
    mass[6, 2] = 0.5
    recall = NeedleRecall(mass > 0, mass, needle_blocks=(3,), query_block=9)
    assert auto_heatmap_layers(recall, None, 12) == [0, 6, 11]


def test_the_old_cli_module_still_answers_with_a_deprecation_warning():
    import sparse_lens.cli.trace_report as old
    import sparse_lens.report.trace as new

    with pytest.warns(DeprecationWarning, match="sparse_lens.report.trace.parse_layers"):
        assert old.parse_layers is new.parse_layers
    with pytest.raises(AttributeError):
        old.no_such_name


def test_recall_scope_names_the_pruned_layers_and_the_exact_ones():
    gemma = recall_scope([5, 11, 17], 18)
    assert gemma.startswith("mass_recall_mean (mass recall, mean over the 3 pruned layers: pruned_layers)")
    assert "the 15 windowed layers (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16) keep" in gemma
    assert "the windowed layer 1 keeps" in recall_scope([0, 2], 3)
    every = recall_scope([0, 1], 2)
    assert "mean over the 2 pruned layers" in every and "windowed" not in every
