"""Spearman (average ranks for ties, NaNs dropped) and the agreement of two results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_lens.analysis.anchors.agreement import compare_anchors, rank_average, spearman
from sparse_lens.analysis.anchors.salience import ThoughtAnchors, anchors_from_vertical_scores


def test_spearman_and_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, float("nan"), 3, 4], [2, 5, 1, 3]) == pytest.approx(0.5)  # NaN pair dropped
    assert math.isnan(spearman([1, float("nan")], [2, 3]))
    np.testing.assert_array_equal(rank_average(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_compare_anchors():
    scores = torch.rand(2, 3, 10, generator=torch.Generator().manual_seed(0))
    a = anchors_from_vertical_scores(scores, top_heads=3)
    agreement = compare_anchors(a, a, k=4)
    assert agreement.spearman == pytest.approx(1.0) and agreement.receiver_overlap == 1.0 and agreement.anchor_overlap == 1.0
    assert agreement.shared_receivers == a.receiver_heads and "Spearman 1.000" in str(agreement)
    b = anchors_from_vertical_scores(-scores, top_heads=3)
    assert compare_anchors(a, b).spearman < 0
    with pytest.raises(ValueError, match="sentence counts"):
        compare_anchors(a, anchors_from_vertical_scores(scores[..., :5], top_heads=3))


def test_compare_anchors_counts_what_the_two_results_share():
    """Hand-made results: 2 of 3 receiver heads shared, 2 of the top 3 anchors; NaN (unscored)
    sentences of either side left out of the Spearman and of the anchors."""
    nan = float("nan")

    def result(receivers, salience):
        salience = torch.tensor(salience)
        return ThoughtAnchors(torch.zeros(2, 2, len(salience)), torch.zeros(2, 2), receivers, salience)

    a = result(((0, 0), (0, 1), (1, 0)), [0.9, 0.1, 0.5, 0.7, 0.3, nan])  # top 3: 0, 3, 2
    b = result(((1, 1), (1, 0), (0, 1)), [0.2, 0.8, 0.6, 0.9, nan, 0.1])  # top 3: 3, 1, 2
    agreement = compare_anchors(a, b, k=3)
    assert agreement.shared_receivers == ((0, 1), (1, 0)) and agreement.receiver_overlap == pytest.approx(2 / 3)
    assert agreement.shared_anchors == (3, 2) and agreement.anchor_overlap == pytest.approx(2 / 3)
    # sentences 0-3 scored in both: ranks (4, 1, 2, 3) against (1, 3, 2, 4), 1 - 6 * 14 / (4 * 15)
    assert agreement.spearman == pytest.approx(-0.4)
    # k above the 5 scored sentences of each: 4 shared of the 5 that can be
    wide = compare_anchors(a, b, k=6)
    assert wide.shared_anchors == (0, 3, 2, 1) and wide.anchor_overlap == pytest.approx(4 / 5)

