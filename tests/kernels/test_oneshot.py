"""One-shot baselines (mean-pooled, antidiagonal) against brute force."""

import pytest
import torch

from sparse_lens.kernels import oneshot
from tests.kernels.estimator_cases import (
    assert_selection,
    brute_force_selection,
    loop_block_scores,
    random_qk,
)


@pytest.mark.parametrize("seq,query_block,key_block", [(96, 8, 8), (90, 16, 8), (150, 8, 16)])
def test_oneshot_pooled_equals_brute_force(seq, query_block, key_block):
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=seq, seed=8)
    top_k, sink, local = 5, 1, 1
    chosen = oneshot.oneshot_pooled_estimate(query, key, query_block=query_block, key_block=key_block, top_k=top_k,
                                         sink_blocks=sink, local_blocks=local)
    scores = loop_block_scores(query, key, query_block, key_block, lambda q, k: float(q.mean(0) @ k.mean(0)))
    assert_selection(chosen, brute_force_selection(scores, seq, query_block, key_block, top_k, sink, local))


def loop_antidiagonal_scores(query, key, query_block, key_block, stride):
    """Sum of q_i . k_t over causal pairs with (i + t) % stride == stride - 1, per block pair."""
    batch, q_heads, seq, _ = query.shape
    group = q_heads // key.shape[1]
    scores = torch.zeros(batch, q_heads, -(-seq // query_block), -(-seq // key_block), dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(seq):
                for t in range(i + 1):
                    if (i + t) % stride == stride - 1:
                        scores[b, h, i // query_block, t // key_block] += float(query[b, h, i] @ key[b, h // group, t])
    return scores


@pytest.mark.parametrize("seq,query_block,key_block", [(64, 8, 8), (61, 16, 8), (93, 8, 16)])
def test_antidiagonal_scores_and_selection_equal_brute_force(seq, query_block, key_block):
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=seq, seed=9)
    expected = loop_antidiagonal_scores(query, key, query_block, key_block, 4)
    got = oneshot.antidiagonal_block_scores(query, key, query_block=query_block, key_block=key_block, stride=4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    top_k, sink, local = 4, 1, 1
    chosen = oneshot.antidiagonal_estimate(query, key, query_block=query_block, key_block=key_block, top_k=top_k,
                                       sink_blocks=sink, local_blocks=local, stride=4)
    assert_selection(chosen, brute_force_selection(expected, seq, query_block, key_block, top_k, sink, local))


def test_antidiagonal_softmax_equals_brute_force():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=37, seed=10)
    stride, block, scale = 4, 8, 0.5
    n_tiles = -(-37 // stride)
    tile = torch.zeros(2, n_tiles, n_tiles, dtype=torch.float64)
    for h in range(2):
        for i in range(37):
            for t in range(i + 1):
                if (i + t) % stride == stride - 1:
                    tile[h, i // stride, t // stride] += float(query[0, h, i] @ key[0, 0, t])
    expected = torch.zeros(2, -(-37 // block), -(-37 // block), dtype=torch.float64)
    for h in range(2):
        for m in range(n_tiles):
            probs = torch.softmax(tile[h, m, : m + 1] * scale / stride, dim=0)
            for n in range(m + 1):
                expected[h, m * stride // block, n * stride // block] += probs[n]
    got = oneshot.antidiagonal_block_scores(query, key, query_block=block, key_block=block, stride=stride,
                                        normalize="softmax", scale=scale)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-4, atol=1e-5)
