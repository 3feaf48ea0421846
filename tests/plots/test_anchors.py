"""Salience bars with highlighted sentences (e.g. the needle), on synthetic vertical scores."""

import torch

from sparse_lens.analysis import anchors_from_vertical_scores
from sparse_lens.plots import plot_salience


def test_salience_bars_with_a_highlighted_sentence(tmp_path):
    scores = torch.rand(3, 4, 30, generator=torch.Generator().manual_seed(0))
    scores[..., -4:] = float("nan")  # the last `proximity` sentences have no score
    anchors = anchors_from_vertical_scores(scores, top_heads=5)
    sentences = [f"Sentence {index}." for index in range(30)]
    path = plot_salience(anchors, tmp_path / "salience.png", sentences=sentences, highlight=[7, 99],
                         highlight_label="needle sentence")
    assert path.stat().st_size > 5000
    # Pooled bars (more sentences than max_bars) still take highlights.
    assert plot_salience(anchors, tmp_path / "pooled.png", max_bars=10, highlight=[3]).stat().st_size > 5000
