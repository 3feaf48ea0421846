"""Sparse sentence attention: exact when nothing is pruned and blocks align, otherwise the
documented approximation (block_mass shared by causal token pairs) or the kept cells' exact
token weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.anchors.salience import vertical_scores, vertical_scores_sparse
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
    pattern = replace(tiny_traces[0][6][0], query=None, key=None)
    sentence_attention_sparse(pattern, UNALIGNED)  # block_mass only: fine
    with pytest.raises(ValueError, match="keep_qk"):
        sentence_attention_sparse(pattern, UNALIGNED, token_level=True)


def random_block_pattern(seq_len: int, query_block: int, key_block: int, top_k: int, heads: int, seed: int):
    """Random causal kept sets (ascending, -1 padded) with random block masses."""
    generator = torch.Generator().manual_seed(seed)
    n_rows = -(-seq_len // query_block)
    indices = torch.full((1, heads, n_rows, top_k), -1, dtype=torch.int64)
    for head in range(heads):
        for row in range(n_rows):
            visible = (min((row + 1) * query_block, seq_len) - 1) // key_block + 1
            kept = torch.randperm(visible, generator=generator)[:top_k].sort().values
            indices[0, head, row, :len(kept)] = kept
    mass = torch.rand(indices.shape, generator=generator).masked_fill(indices < 0, 0)
    return sl.BlockSparsePattern(indices, mass, torch.zeros(1, heads, seq_len), seq_len, query_block, key_block, 1.0)


def brute_block_mass_matrix(pattern, spans) -> np.ndarray:
    """The documented approximation token by token from ``block_mass``: each kept cell's mass
    ``block_mass x n_queries`` spread evenly over its causal token pairs, summed per sentence pair
    and divided by both sentence sizes."""
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    sentence_of = np.full(seq_len, -1)
    for index, (a, b) in enumerate(spans):
        sentence_of[a:b] = index
    sizes = np.array([b - a for a, b in spans], dtype=float)
    indices, mass = pattern.block_indices[0].numpy(), pattern.block_mass[0].double().numpy()
    out = np.zeros((indices.shape[0], len(spans), len(spans)))
    for head, row, slot in zip(*np.nonzero(indices >= 0)):
        block = row + pattern.first_query_block
        queries = np.arange(block * qb, min((block + 1) * qb, seq_len))[:, None]
        keys = np.arange(indices[head, row, slot] * kb, min((indices[head, row, slot] + 1) * kb, seq_len))[None, :]
        causal = np.broadcast_to(keys <= queries, (queries.size, keys.size))
        share = mass[head, row, slot] * queries.size / causal.sum()
        counted = causal & (sentence_of[queries] >= 0) & (sentence_of[keys] >= 0)
        q, k = np.broadcast_arrays(sentence_of[queries], sentence_of[keys])
        np.add.at(out[head], (q[counted], k[counted]), share)
    return out / (sizes[:, None] * sizes[None, :])


@pytest.mark.parametrize("query_block,key_block", [(4, 4), (8, 4), (4, 8)])
def test_factored_vertical_sums_match_token_by_token_brute_force(query_block, key_block):
    """The factored block-mass vertical sums (suffix sums off the diagonal, pair by pair on it),
    and the [head, n, n] matrix, against the approximation token by token: blocks of unequal
    sizes, a partial last block, gaps between sentences, sentences longer than a block, a pattern
    sliced along queries, several proximities."""
    seq_len = 61
    spans = [(2, 5), (5, 6), (6, 17), (19, 23), (23, 24), (24, 31), (33, 51), (51, 55), (55, 58), (58, 61)]
    pattern = random_block_pattern(seq_len, query_block, key_block, top_k=3, heads=2, seed=query_block * 10 + key_block)
    expected = brute_block_mass_matrix(pattern, spans)
    np.testing.assert_allclose(sentence_attention_sparse(pattern, spans).numpy(), expected, rtol=1e-5, atol=1e-9)
    for proximity in (1, 2, 4):
        np.testing.assert_allclose(vertical_scores_sparse(pattern, spans, proximity=proximity).numpy(),
                                   vertical_scores(torch.from_numpy(expected), proximity).numpy(),
                                   rtol=1e-5, atol=1e-9, equal_nan=True)
    sliced = replace(pattern, block_indices=pattern.block_indices[:, :, 3:6], block_mass=pattern.block_mass[:, :, 3:6],
                     first_query_block=3)
    np.testing.assert_allclose(vertical_scores_sparse(sliced, spans).numpy(),
                               vertical_scores(torch.from_numpy(brute_block_mass_matrix(sliced, spans))).numpy(),
                               rtol=1e-5, atol=1e-9, equal_nan=True)
