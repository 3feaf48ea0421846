"""Sparse sentence attention: exact when nothing is pruned and blocks align, otherwise the
documented approximation (block_mass shared by causal token pairs) or the kept cells' exact
token weights."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_lens.analysis.anchors.sparse import sentence_attention_sparse
from tests.analysis.anchors.reference import (
    ALIGNED,
    BLOCK,
    SEQ,
    UNALIGNED,
    brute_block_approximation,
    brute_sentence_matrix,
)


def test_sparse_sentence_attention_equals_dense_when_nothing_is_pruned_and_blocks_align(tiny_traces):
    traces, probs = tiny_traces
    assert ALIGNED[-1][1] <= SEQ and all(a % BLOCK == 0 and b % BLOCK == 0 for a, b in ALIGNED)
    for layer, pattern in enumerate(traces[SEQ // BLOCK]):
        assert pattern.pruned_fraction() == 0.0
        brute = brute_sentence_matrix(probs[layer].numpy(), ALIGNED)
        for token_level in (False, True):
            np.testing.assert_allclose(sentence_attention_sparse(pattern, ALIGNED, token_level=token_level).numpy(),
                                       brute, rtol=1e-5, atol=1e-8)


def kept_mask(indices: np.ndarray, shape) -> np.ndarray:
    kept = np.zeros(shape, dtype=bool)
    for head in range(indices.shape[0]):
        for row in range(indices.shape[1]):
            for key_block in indices[head, row][indices[head, row] >= 0]:
                kept[head, row * BLOCK:(row + 1) * BLOCK, key_block * BLOCK:(key_block + 1) * BLOCK] = True
    return kept


@pytest.mark.parametrize("top_k", [SEQ // BLOCK, 6])
def test_unaligned_and_pruned_sentences_follow_the_documented_approximation(tiny_traces, top_k):
    traces, probs = tiny_traces
    for layer, pattern in enumerate(traces[top_k]):
        dense = probs[layer].numpy()
        indices = pattern.block_indices[0].numpy()
        expected = brute_block_approximation(dense, UNALIGNED, indices, BLOCK)
        np.testing.assert_allclose(sentence_attention_sparse(pattern, UNALIGNED).numpy(), expected,
                                   rtol=1e-5, atol=1e-9)
        # token_level: the exact dense weights of the kept cells, pruned cells 0
        kept = kept_mask(indices, dense.shape)
        np.testing.assert_allclose(
            sentence_attention_sparse(pattern, UNALIGNED, token_level=True).numpy(),
            brute_sentence_matrix(np.where(kept, dense, 0.0), UNALIGNED), rtol=1e-5, atol=1e-9)


def test_pruning_only_loses_mass(tiny_traces):
    traces, probs = tiny_traces
    pruned = traces[6][1]
    assert pruned.pruned_fraction() > 0.5
    dense_matrix = brute_sentence_matrix(probs[1].numpy(), UNALIGNED)
    assert (sentence_attention_sparse(pruned, UNALIGNED, token_level=True).numpy() <= dense_matrix + 1e-7).all()


def test_token_level_needs_the_patterns_queries_and_keys(tiny_traces):
    from dataclasses import replace

    pattern = replace(tiny_traces[0][6][0], query=None, key=None)
    sentence_attention_sparse(pattern, UNALIGNED)  # block_mass only: fine
    with pytest.raises(ValueError, match="keep_qk"):
        sentence_attention_sparse(pattern, UNALIGNED, token_level=True)
