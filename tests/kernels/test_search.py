"""Hierarchical searches (pooled, bounds): brute-force equalities, the sparse table and Quest's bound."""

import math

import pytest
import torch

from sparse_lens.kernels import blocks, search
from sparse_lens.kernels.stream import (
    score_branches_by_center_block,
    stream_estimate,
)
from tests.kernels.estimator_cases import (
    assert_selection,
    brute_force_selection,
    loop_block_scores,
    random_qk,
)

HIERARCHICAL_SCORES = {
    # pooled: max over the block's queries of q . mean key
    "pooled": (search.pooled_estimate, lambda q, k: float((q @ k.mean(0)).max())),
    "pooled_meanq": (lambda q, k, **kw: search.pooled_estimate(q, k, query_stride=0, mean_query=True, **kw),
                     lambda q, k: float(q.mean(0) @ k.mean(0))),
    # bounds: max over queries of sum_d max(q_d * kmax_d, q_d * kmin_d)
    "bounds": (search.bounds_estimate, lambda q, k: float(torch.maximum(
        q[:, None, :] * k.amax(0), q[:, None, :] * k.amin(0)).sum(-1).max())),
}


@pytest.mark.parametrize("name", list(HIERARCHICAL_SCORES))
@pytest.mark.parametrize("seq", [56, 53])
def test_hierarchical_equals_brute_force_when_one_round_scores_every_block(name, seq):
    # Searched ranges of <= 2 * n_search blocks: the first round scores every single block.
    estimator, score_pair = HIERARCHICAL_SCORES[name]
    block, top_k, sink, local = 4, 8, 1, 1  # n_search 6: searched ranges <= 12 blocks while T <= 56
    query, key = random_qk(batch=2, q_heads=4, kv_heads=2, seq=seq, seed=5)
    chosen = estimator(query, key, query_block=block, key_block=block, top_k=top_k, sink_blocks=sink,
                       local_blocks=local)
    scores = loop_block_scores(query, key, block, block, score_pair)
    assert_selection(chosen, brute_force_selection(scores, seq, block, block, top_k, sink, local))


def test_generic_search_with_the_centre_block_score_is_stream():
    query, key = random_qk(seq=300, d=16, seed=6)
    settings = dict(query_block=16, key_block=16, top_k=6, sink_blocks=1, local_blocks=1)
    key_blocks = blocks.split_into_blocks(key, 16)

    def centre_score(query_blocks, block_ids, start, end):
        return score_branches_by_center_block(query_blocks, key_blocks, block_ids, start, end, seq_len=300,
                                              query_block=16, key_block=16, representative_keys=8)

    searched = search.hierarchical_search(query, key, centre_score, blocks.BlockGeometry(**settings),
                                              bytes_per_candidate=4096)
    assert torch.equal(searched, stream_estimate(query, key, **settings))


def test_pooled_mean_query_changes_nothing_when_every_query_scores():
    # qbar . k is the mean of the q_i . k, never above their max.
    query, key = random_qk(seq=200, seed=7)
    settings = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    assert torch.equal(search.pooled_estimate(query, key, mean_query=True, **settings),
                       search.pooled_estimate(query, key, **settings))


@pytest.mark.parametrize("seq,key_block", [(96, 8), (93, 8), (40, 4)])
def test_sparse_table_range_min_max_equals_direct(seq, key_block):
    _, key = random_qk(batch=2, kv_heads=2, q_heads=4, seq=seq, seed=14)
    table_min, table_max = search.build_sparse_table(key, key_block)
    n_blocks = -(-seq // key_block)
    assert table_min.shape[2] == int(math.log2(n_blocks)) + 1
    starts, ends = zip(*[(s, e) for s in range(n_blocks) for e in range(s + 1, n_blocks + 1)])
    start = torch.tensor(starts).expand(2, 4, -1)
    end = torch.tensor(ends).expand(2, 4, -1)
    low, high = search.range_min_max(table_min, table_max, start, end)
    for i, (s, e) in enumerate(zip(starts, ends)):
        keys = key[:, :, s * key_block: min(e * key_block, seq)]
        assert torch.equal(low[:, ::2, i], keys.amin(2)) and torch.equal(low[:, 1::2, i], keys.amin(2))
        assert torch.equal(high[:, ::2, i], keys.amax(2)) and torch.equal(high[:, 1::2, i], keys.amax(2))


def test_bound_is_at_least_the_true_max_over_the_range():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=128, d=16, seed=15)
    table_min, table_max = search.build_sparse_table(key, 8)
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(0, 15, (1, 2, 1, 20), generator=generator)
    end = (start + torch.randint(1, 8, start.shape, generator=generator)).clamp(max=16)
    low, high = search.range_min_max(table_min, table_max, start, end)
    queries = query[:, :, None, :12]  # [1, 2, 1, 12, d]
    bound = search.upper_bound_scores(queries, low, high)  # [1, 2, 1, 20, 12]
    for h in range(2):
        for c in range(20):
            s, e = int(start[0, h, 0, c]), int(end[0, h, 0, c])
            true_max = (queries[0, h, 0] @ key[0, 0, s * 8: e * 8].T).amax(-1)
            assert (bound[0, h, 0, c] >= true_max - 1e-4).all()
    # tight when the range holds a single key
    single = key[:, :, :1].expand(1, 1, 1, 16)
    one = search.upper_bound_scores(queries[:, :1], single[:, :, None], single[:, :, None])
    torch.testing.assert_close(one[0, 0, 0, 0], queries[0, 0, 0] @ key[0, 0, 0])
