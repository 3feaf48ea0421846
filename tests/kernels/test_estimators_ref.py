"""Alternative block-selection estimators: output contract, brute-force equalities, sparse table, bound."""

import math

import pytest
import torch

from sparse_lens.errors import ShapeError
from sparse_lens.kernels import estimators_ref as est
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.kernels.dense_ref import dense_attention, dense_block_mass
from sparse_lens.kernels.estimator_ref import score_branches_by_center_block, stream_estimate

FIXED_K = {
    "pooled": est.pooled_estimate,
    "pooled_strided_meanq": lambda q, k, **kw: est.pooled_estimate(q, k, query_stride=4, mean_query=True, **kw),
    "pooled_meanq": lambda q, k, **kw: est.pooled_estimate(q, k, query_stride=0, mean_query=True, **kw),
    "bounds": est.bounds_estimate,
    "oneshot_pooled": est.oneshot_pooled_estimate,
    "antidiagonal": est.antidiagonal_estimate,
    "antidiagonal_softmax": lambda q, k, **kw: est.antidiagonal_estimate(q, k, normalize="softmax", **kw),
    "rescored": est.rescored_estimate,
    "rescored_pooled": lambda q, k, **kw: est.rescored_estimate(q, k, search="pooled", beam=2, **kw),
}


def random_qk(batch=1, q_heads=4, kv_heads=2, seq=128, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_heads, seq, d, generator=generator),
            torch.randn(batch, kv_heads, seq, d, generator=generator))


def check_rows(indices, seq, query_block, key_block, width, sink, local, count):
    """Sorted, unique, causal, -1 only at the end, sink/local kept; ``count(n_visible, used)`` checks the size."""
    visible = visible_key_blocks(seq, query_block, key_block)
    assert indices.dtype == torch.int64 and indices.shape[2:] == (len(visible), width)
    for row_visible, rows in zip(visible.tolist(), indices.permute(2, 0, 1, 3).reshape(len(visible), -1, width)):
        for row in rows.tolist():
            used = [b for b in row if b >= 0]
            assert used == sorted(set(used)), row
            assert row[len(used):] == [-1] * (width - len(used)), row
            assert all(0 <= b < row_visible for b in used), row
            count(row_visible, used)
            if row_visible > width or len(used) < row_visible:
                fixed = set(range(sink)) | set(range(max(0, row_visible - local), row_visible))
                assert fixed <= set(used), (row, fixed)


# ----- output contract ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FIXED_K))
@pytest.mark.parametrize("seq,query_block,key_block", [(130, 16, 16), (100, 16, 8), (77, 8, 16)])
def test_fixed_budget_contract(name, seq, query_block, key_block):
    query, key = random_qk(batch=2, q_heads=6, kv_heads=3, seq=seq)
    top_k, sink, local = 5, 1, 2
    chosen = FIXED_K[name](query, key, query_block=query_block, key_block=key_block, top_k=top_k,
                           sink_blocks=sink, local_blocks=local)
    assert chosen.shape[:2] == (2, 6)

    def exact_count(n_visible, used):
        assert len(used) == min(top_k, n_visible)

    check_rows(chosen, seq, query_block, key_block, top_k, sink, local, exact_count)


@pytest.mark.parametrize("estimate", ["exact", "pooled"])
@pytest.mark.parametrize("seq,query_block,key_block", [(130, 16, 16), (100, 16, 8), (77, 8, 16)])
def test_adaptive_contract(estimate, seq, query_block, key_block):
    query, key = random_qk(batch=2, q_heads=6, kv_heads=3, seq=seq, seed=2)
    query = query * 3  # peakier attention, so that rows keep different counts
    cap, floor, sink, local = 7, 3, 1, 1
    chosen = est.adaptive_estimate(query, key, query_block=query_block, key_block=key_block, p=0.7,
                                   min_blocks=floor, max_blocks=cap, sink_blocks=sink, local_blocks=local,
                                   estimate=estimate)

    def bounded_count(n_visible, used):
        assert min(floor, n_visible) <= len(used) <= min(cap, n_visible)

    check_rows(chosen, seq, query_block, key_block, cap, sink, local, bounded_count)


@pytest.mark.parametrize("estimate", ["exact", "pooled"])
def test_adaptive_keeps_few_blocks_for_a_peaked_head_and_many_for_a_diffuse_one(estimate):
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=256, d=8, seed=3)
    key = key * 0.1
    key[0, 0, 80:96, 0] = 4.0  # key block 5 (of 16-token blocks)
    query[0, 0] = 0.0  # uniform attention
    query[0, 1] = 0.0
    query[0, 1, :, 0] = 5.0  # every query looks at block 5
    chosen = est.adaptive_estimate(query, key, query_block=16, key_block=16, p=0.9, min_blocks=3, max_blocks=10,
                                   sink_blocks=1, local_blocks=1, estimate=estimate)
    last = chosen[0, :, -1]
    assert (last[0] >= 0).sum() == 10  # diffuse: hits the cap
    assert set(last[1].tolist()) - {-1} == {0, 5, 15}  # peaked: sink, the planted block, local


@pytest.mark.parametrize("name", ["pooled", "bounds", "oneshot_pooled", "antidiagonal", "rescored"])
def test_gqa_query_heads_sharing_a_key_head_search_independently(name):
    query, key = random_qk(q_heads=4, kv_heads=1, seq=256, seed=1)
    query[:, 1] = -query[:, 0]
    query[:, 2] = query[:, 0]
    chosen = FIXED_K[name](query, key, query_block=16, key_block=16, top_k=4, sink_blocks=0, local_blocks=1)
    assert not torch.equal(chosen[:, 0], chosen[:, 1])
    assert torch.equal(chosen[:, 0], chosen[:, 2])


def test_gqa_reads_the_shared_key_head():
    query, key = random_qk(q_heads=4, kv_heads=2, seq=192, seed=4)
    kwargs = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    for name in ("pooled", "bounds", "antidiagonal", "rescored"):
        together = FIXED_K[name](query, key, **kwargs)
        # query head 3 reads key head 1: alone with that key head it must choose the same blocks
        alone = FIXED_K[name](query[:, 3:4], key[:, 1:2], **kwargs)
        assert torch.equal(together[:, 3:4], alone), name


def test_rejects_bad_inputs():
    query, key = random_qk(q_heads=3, kv_heads=2)
    with pytest.raises(ShapeError):
        est.pooled_estimate(query, key, query_block=16, key_block=16, top_k=4)
    query, key = random_qk()
    with pytest.raises(ValueError):
        est.bounds_estimate(query, key, query_block=16, key_block=16, top_k=2, sink_blocks=2, local_blocks=1)
    with pytest.raises(ValueError):
        est.oneshot_pooled_estimate(query, key, query_block=16, key_block=24, top_k=4)


# ----- brute force ----------------------------------------------------------------------------
def loop_block_scores(query, key, query_block, key_block, score_pair):
    """[batch, q_head, n_qb, n_kb] filled by ``score_pair(q_rows, k_rows)`` over real tokens."""
    batch, q_heads, seq, _ = query.shape
    group = q_heads // key.shape[1]
    n_qb, n_kb = -(-seq // query_block), -(-seq // key_block)
    scores = torch.zeros(batch, q_heads, n_qb, n_kb, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for j in range(n_qb):
                q_rows = query[b, h, j * query_block: min((j + 1) * query_block, seq)].double()
                for kb in range(n_kb):
                    k_rows = key[b, h // group, kb * key_block: min((kb + 1) * key_block, seq)].double()
                    scores[b, h, j, kb] = score_pair(q_rows, k_rows)
    return scores


def brute_force_selection(scores, seq, query_block, key_block, top_k, sink, local):
    """Rows seeing more than top_k blocks: sink + local + top n_search of the searched range (sets)."""
    visible = visible_key_blocks(seq, query_block, key_block).tolist()
    chosen = {}
    for j, n_visible in enumerate(visible):
        if n_visible <= top_k:
            continue
        searched = scores[:, :, j, sink: n_visible - local]
        best = searched.topk(top_k - sink - local, dim=-1).indices + sink
        fixed = set(range(sink)) | set(range(n_visible - local, n_visible))
        chosen[j] = [[fixed | set(row) for row in head] for head in best.tolist()]
    return chosen


def assert_selection(indices, expected):
    assert expected, "no searched row: the test does not test anything"
    for j, per_batch in expected.items():
        for b, per_head in enumerate(per_batch):
            for h, blocks in enumerate(per_head):
                assert set(indices[b, h, j].tolist()) == blocks, (j, b, h)


HIERARCHICAL_SCORES = {
    # pooled: max over the block's queries of q . mean key
    "pooled": (est.pooled_estimate, lambda q, k: float((q @ k.mean(0)).max())),
    "pooled_meanq": (lambda q, k, **kw: est.pooled_estimate(q, k, query_stride=0, mean_query=True, **kw),
                     lambda q, k: float(q.mean(0) @ k.mean(0))),
    # bounds: max over queries of sum_d max(q_d * kmax_d, q_d * kmin_d)
    "bounds": (est.bounds_estimate, lambda q, k: float(torch.maximum(
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
    key_blocks = est.split_into_blocks(key, 16)

    def centre_score(query_blocks, block_ids, start, end):
        return score_branches_by_center_block(query_blocks, key_blocks, block_ids, start, end, seq_len=300,
                                              query_block=16, key_block=16, representative_keys=8)

    searched = est.hierarchical_search(query, key, centre_score, bytes_per_candidate=4096, **settings)
    assert torch.equal(searched, stream_estimate(query, key, **settings))


def test_pooled_mean_query_changes_nothing_when_every_query_scores():
    # qbar . k is the mean of the q_i . k, never above their max.
    query, key = random_qk(seq=200, seed=7)
    settings = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    assert torch.equal(est.pooled_estimate(query, key, mean_query=True, **settings),
                       est.pooled_estimate(query, key, **settings))


@pytest.mark.parametrize("seq,query_block,key_block", [(96, 8, 8), (90, 16, 8), (150, 8, 16)])
def test_oneshot_pooled_equals_brute_force(seq, query_block, key_block):
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=seq, seed=8)
    top_k, sink, local = 5, 1, 1
    chosen = est.oneshot_pooled_estimate(query, key, query_block=query_block, key_block=key_block, top_k=top_k,
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
    got = est.antidiagonal_block_scores(query, key, query_block=query_block, key_block=key_block, stride=4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    top_k, sink, local = 4, 1, 1
    chosen = est.antidiagonal_estimate(query, key, query_block=query_block, key_block=key_block, top_k=top_k,
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
    got = est.antidiagonal_block_scores(query, key, query_block=block, key_block=block, stride=stride,
                                        normalize="softmax", scale=scale)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_rescored_with_every_block_a_candidate_is_the_dense_top_k():
    # beam * n_search covers the whole range: the exact rescoring sees every block, so it keeps
    # the sink, the local blocks and the n_search blocks of largest dense attention mass.
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=96, d=8, seed=11)
    query = query * 2
    block, top_k, sink, local, scale = 8, 5, 1, 1, 0.4
    chosen = est.rescored_estimate(query, key, query_block=block, key_block=block, top_k=top_k, sink_blocks=sink,
                                   local_blocks=local, beam=4, scale=scale)
    _, lse = dense_attention(query, key, key, scale=scale)
    mass = dense_block_mass(query, key, lse, query_block=block, key_block=block, scale=scale)
    assert_selection(chosen, brute_force_selection(mass, 96, block, block, top_k, sink, local))


def test_exact_candidate_mass_of_every_block_is_the_dense_block_mass():
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=70, seed=12)
    n_visible = visible_key_blocks(70, 16, 8)
    candidates = est.keep_all_rows(n_visible, 9).expand(1, 4, -1, -1)
    mass = est.candidate_block_mass(query, key, candidates, query_block=16, key_block=8, sink_blocks=1,
                                    local_blocks=2, estimate="exact", scale=0.3)
    _, lse = dense_attention(query, key, key, scale=0.3)
    dense = dense_block_mass(query, key, lse, query_block=16, key_block=8, scale=0.3)
    torch.testing.assert_close(mass, dense, rtol=1e-4, atol=1e-6)


def test_adaptive_with_every_block_a_candidate_keeps_the_smallest_set_reaching_p():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=128, seed=13)
    query = query * 3
    block, p, scale = 8, 0.8, 0.5
    chosen = est.adaptive_estimate(query, key, query_block=block, key_block=block, p=p, min_blocks=2,
                                   max_blocks=16, sink_blocks=1, local_blocks=1, estimate="exact", scale=scale)
    _, lse = dense_attention(query, key, key, scale=scale)
    mass = dense_block_mass(query, key, lse, query_block=block, key_block=block, scale=scale)
    for h in range(2):
        for j in range(16):
            kept = [b for b in chosen[0, h, j].tolist() if b >= 0]
            kept_mass = float(mass[0, h, j, kept].sum())
            optional = sorted((b for b in kept if b not in (0, j)), key=lambda b: float(mass[0, h, j, b]))
            if len(kept) > 2:  # more than the floor: reaches p, and not without its lightest block
                assert kept_mass >= p - 1e-5
                assert kept_mass - float(mass[0, h, j, optional[0]]) < p


# ----- sparse table and bound ----------------------------------------------------------------
@pytest.mark.parametrize("seq,key_block", [(96, 8), (93, 8), (40, 4)])
def test_sparse_table_range_min_max_equals_direct(seq, key_block):
    _, key = random_qk(batch=2, kv_heads=2, q_heads=4, seq=seq, seed=14)
    table_min, table_max = est.build_sparse_table(key, key_block)
    n_blocks = -(-seq // key_block)
    assert table_min.shape[2] == int(math.log2(n_blocks)) + 1
    starts, ends = zip(*[(s, e) for s in range(n_blocks) for e in range(s + 1, n_blocks + 1)])
    start = torch.tensor(starts).expand(2, 4, -1)
    end = torch.tensor(ends).expand(2, 4, -1)
    low, high = est.range_min_max(table_min, table_max, start, end)
    for i, (s, e) in enumerate(zip(starts, ends)):
        keys = key[:, :, s * key_block: min(e * key_block, seq)]
        assert torch.equal(low[:, ::2, i], keys.amin(2)) and torch.equal(low[:, 1::2, i], keys.amin(2))
        assert torch.equal(high[:, ::2, i], keys.amax(2)) and torch.equal(high[:, 1::2, i], keys.amax(2))


def test_bound_is_at_least_the_true_max_over_the_range():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=128, d=16, seed=15)
    table_min, table_max = est.build_sparse_table(key, 8)
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(0, 15, (1, 2, 1, 20), generator=generator)
    end = (start + torch.randint(1, 8, start.shape, generator=generator)).clamp(max=16)
    low, high = est.range_min_max(table_min, table_max, start, end)
    queries = query[:, :, None, :12]  # [1, 2, 1, 12, d]
    bound = est.upper_bound_scores(queries, low, high)  # [1, 2, 1, 20, 12]
    for h in range(2):
        for c in range(20):
            s, e = int(start[0, h, 0, c]), int(end[0, h, 0, c])
            true_max = (queries[0, h, 0] @ key[0, 0, s * 8: e * 8].T).amax(-1)
            assert (bound[0, h, 0, c] >= true_max - 1e-4).all()
    # tight when the range holds a single key
    single = key[:, :, :1].expand(1, 1, 1, 16)
    one = est.upper_bound_scores(queries[:, :1], single[:, :, None], single[:, :, None])
    torch.testing.assert_close(one[0, 0, 0, 0], queries[0, 0, 0] @ key[0, 0, 0])
