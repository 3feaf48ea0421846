"""Vertical scores, kurtosis, receiver heads and salience against brute force; sparse and dense
thought anchors agree exactly on a tiny model when nothing is pruned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.anchors.agreement import compare_anchors
from sparse_lens.analysis.anchors.salience import (
    anchors_from_vertical_scores,
    fisher_kurtosis,
    observe_thought_anchors,
    thought_anchors,
    vertical_scores,
    vertical_scores_sparse,
)
from sparse_lens.analysis.anchors.sparse import sentence_attention_sparse
from tests.analysis.anchors.reference import (
    ALIGNED,
    BLOCK,
    SEQ,
    UNALIGNED,
    brute_kurtosis,
    brute_sentence_matrix,
    brute_vertical,
)
from tests.conftest import sparse_and_dense, tiny_llama_config


def test_vertical_scores_kurtosis_receivers_and_salience_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    layers, heads, n = 3, 5, 12
    matrices = torch.rand(layers, heads, n, n, generator=generator) ** 6  # heavy-tailed, like attention
    scores = vertical_scores(matrices)
    brute_scores = np.stack([[brute_vertical(matrices[l, h].numpy()) for h in range(heads)] for l in range(layers)])
    np.testing.assert_allclose(scores.numpy(), brute_scores, rtol=1e-5, equal_nan=True)
    assert torch.isnan(scores[..., -4:]).all() and not torch.isnan(scores[..., :-4]).any()

    result = anchors_from_vertical_scores(scores, top_heads=4)
    kurt = np.array([[brute_kurtosis(brute_scores[l, h]) for h in range(heads)] for l in range(layers)])
    np.testing.assert_allclose(result.kurtosis.numpy(), kurt, rtol=1e-4)
    order = sorted(((l, h) for l in range(layers) for h in range(heads)), key=lambda lh: -kurt[lh])
    assert list(result.receiver_heads) == order[:4]
    salience = np.mean([brute_scores[l, h] for l, h in order[:4]], axis=0)
    np.testing.assert_allclose(result.salience.numpy(), salience, rtol=1e-5, equal_nan=True)
    assert result.anchors(3) == [int(i) for i in np.argsort(-np.nan_to_num(salience, nan=-np.inf))[:3]]
    assert result.anchors(n) == [int(i) for i in np.argsort(-np.nan_to_num(salience, nan=-np.inf))[:n - 4]]  # no NaN
    assert "sentence" in result.summary([f"s{i}" for i in range(n)], k=3)
    # layer exclusion, and a constant head has no kurtosis
    assert all(layer != 0 for layer, _ in anchors_from_vertical_scores(scores, top_heads=4, exclude_layers=[0]).receiver_heads)
    assert math.isnan(float(fisher_kurtosis(torch.tensor([1.0, 1.0, 1.0, float("nan")]))))


@pytest.mark.parametrize("spans", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
def test_sparse_vertical_scores_need_no_sentence_matrix(tiny_traces, spans):
    traces, _ = tiny_traces
    for pattern in traces[6]:
        for token_level in (False, True):
            np.testing.assert_allclose(
                vertical_scores_sparse(pattern, spans, token_level=token_level).numpy(),
                vertical_scores(sentence_attention_sparse(pattern, spans, token_level=token_level)).numpy(),
                rtol=1e-5, atol=1e-9, equal_nan=True)


def test_sparse_and_dense_thought_anchors_agree_when_nothing_is_pruned(tiny_traces):
    traces, probs = tiny_traces
    for layer, pattern in enumerate(traces[SEQ // BLOCK]):
        brute = brute_sentence_matrix(probs[layer].numpy(), ALIGNED)
        np.testing.assert_allclose(vertical_scores_sparse(pattern, ALIGNED).numpy(),
                                   np.stack([brute_vertical(m) for m in brute]), rtol=1e-5, atol=1e-9)
    sparse_result = thought_anchors(traces[SEQ // BLOCK], ALIGNED, top_heads=3)
    pruned = thought_anchors(traces[6], ALIGNED, top_heads=3, method="sparse_tokens")
    assert pruned.pruned_fraction == pytest.approx(np.mean([p.pruned_fraction() for p in traces[6]]))
    assert f"{pruned.pruned_fraction:.0%} pruned" in pruned.summary()
    dense_result = thought_anchors(traces[SEQ // BLOCK], ALIGNED, top_heads=3, method="dense")
    assert sparse_result.receiver_heads == dense_result.receiver_heads
    np.testing.assert_allclose(sparse_result.salience.numpy(), dense_result.salience.numpy(), rtol=1e-5)
    assert compare_anchors(sparse_result, dense_result).spearman == pytest.approx(1.0)
    with pytest.raises(ValueError, match="method"):
        thought_anchors(traces[6], ALIGNED, method="exact")


def test_observe_thought_anchors_runs_the_model_once_per_budget():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=6))
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    results = observe_thought_anchors(sparse, tokens, UNALIGNED, methods=("sparse", "sparse_tokens", "dense"),
                                      top_heads=3, top_k=SEQ // BLOCK)
    assert sparse.stream.top_k == 6 and sparse.stream.mode == "sparse"  # settings restored
    assert compare_anchors(results["sparse_tokens"], results["dense"]).spearman == pytest.approx(1.0)
    np.testing.assert_allclose(results["sparse_tokens"].salience.numpy(), results["dense"].salience.numpy(), rtol=1e-5)
    assert results["sparse"].method == "sparse" and results["sparse"].n_sentences == len(UNALIGNED)
    assert results["sparse"].pruned_fraction == 0.0 and results["dense"].pruned_fraction is None


def test_the_batch_row_asked_for_is_the_one_read(tiny_traces):
    """A batch of two rows, row 0 with other block masses and normalisers: row 1 gives the
    single-row result by every method, row 0 another."""
    from dataclasses import replace

    traces, _ = tiny_traces

    def two_rows(p):
        return replace(p, block_indices=torch.cat([p.block_indices] * 2), block_mass=torch.cat([p.block_mass * 0.5, p.block_mass]),
                       lse=torch.cat([p.lse + 0.7, p.lse]), query=torch.cat([p.query] * 2), key=torch.cat([p.key] * 2))

    batched = [two_rows(pattern) for pattern in traces[6]]
    for method in ("sparse", "sparse_tokens", "dense"):
        expected = thought_anchors(traces[6], UNALIGNED, top_heads=3, method=method)
        row_1 = thought_anchors(batched, UNALIGNED, top_heads=3, method=method, batch=1)
        row_0 = thought_anchors(batched, UNALIGNED, top_heads=3, method=method, batch=0)
        torch.testing.assert_close(row_1.vertical_scores, expected.vertical_scores, equal_nan=True)
        assert not torch.allclose(row_0.vertical_scores, expected.vertical_scores, equal_nan=True)


def test_pruned_fraction_is_the_mean_over_layers(tiny_traces):
    traces, _ = tiny_traces
    mixed = [traces[SEQ // BLOCK][0], traces[6][1]]  # nothing pruned, then most blocks pruned
    assert traces[6][1].pruned_fraction() > 0.5
    result = thought_anchors(mixed, ALIGNED, top_heads=3)
    assert result.pruned_fraction == pytest.approx(traces[6][1].pruned_fraction() / 2)

