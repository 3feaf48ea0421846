"""Spearman (average ranks for ties, NaNs dropped) and the agreement of two results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_lens.analysis.anchors.agreement import compare_anchors, rank_average, spearman
from sparse_lens.analysis.anchors.salience import anchors_from_vertical_scores


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
