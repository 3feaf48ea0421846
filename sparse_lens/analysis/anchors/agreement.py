"""Agreement of two thought-anchor results (typically sparse against dense): Spearman rank
correlation of the saliences, shared receiver heads, shared top anchors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from sparse_lens.analysis.anchors.salience import ThoughtAnchors


@dataclass(frozen=True)
class AnchorAgreement:
    """How far two thought-anchor results agree (typically sparse against dense).

    ``spearman``: rank correlation of the saliences (sentences scored in both);
    ``receiver_overlap``: shared receiver heads / number of receiver heads;
    ``anchor_overlap``: shared top-``k`` anchors / k."""

    spearman: float
    receiver_overlap: float
    anchor_overlap: float
    shared_receivers: tuple[tuple[int, int], ...]
    shared_anchors: tuple[int, ...]
    k: int

    def __str__(self) -> str:
        return (f"Spearman {self.spearman:.3f}, receiver-head overlap {self.receiver_overlap:.2f} "
                f"({len(self.shared_receivers)} shared), top-{self.k} anchor overlap {self.anchor_overlap:.2f}")


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata`` default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start: stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation over the entries finite in both (NaN if fewer than 2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    ra, rb = rank_average(a[keep]), rank_average(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def compare_anchors(a: ThoughtAnchors, b: ThoughtAnchors, k: int = 5) -> AnchorAgreement:
    """Agreement of two results over the same sentences (e.g. sparse ``a`` against dense ``b``)."""
    if a.n_sentences != b.n_sentences:
        raise ValueError(f"Different sentence counts: {a.n_sentences} and {b.n_sentences}.")
    shared_receivers = tuple(head for head in a.receiver_heads if head in set(b.receiver_heads))
    n_receivers = max(len(a.receiver_heads), len(b.receiver_heads), 1)
    top_a, top_b = a.anchors(k), b.anchors(k)
    shared_anchors = tuple(i for i in top_a if i in set(top_b))
    return AnchorAgreement(
        spearman=spearman(a.salience, b.salience),
        receiver_overlap=len(shared_receivers) / n_receivers,
        anchor_overlap=len(shared_anchors) / max(1, min(k, len(top_a), len(top_b))),
        shared_receivers=shared_receivers,
        shared_anchors=shared_anchors,
        k=k,
    )
