"""Rescored and adaptive estimators: dense top-k / top-p when every block is a candidate, budgets."""

import pytest
import torch

from sparse_lens.kernels import blocks, rescore
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.kernels.dense import dense_attention, dense_block_mass
from tests.kernels.estimator_cases import (
    assert_selection,
    brute_force_selection,
    check_rows,
    random_qk,
)


@pytest.mark.parametrize("estimate", ["exact", "pooled"])
@pytest.mark.parametrize("seq,query_block,key_block", [(130, 16, 16), (100, 16, 8), (77, 8, 16)])
def test_adaptive_contract(estimate, seq, query_block, key_block):
    query, key = random_qk(batch=2, q_heads=6, kv_heads=3, seq=seq, seed=2)
    query = query * 3  # peakier attention, so that rows keep different counts
    cap, floor, sink, local = 7, 3, 1, 1
    chosen = rescore.adaptive_estimate(query, key, query_block=query_block, key_block=key_block, p=0.7,
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
    chosen = rescore.adaptive_estimate(query, key, query_block=16, key_block=16, p=0.9, min_blocks=3, max_blocks=10,
                                   sink_blocks=1, local_blocks=1, estimate=estimate)
    last = chosen[0, :, -1]
    assert (last[0] >= 0).sum() == 10  # diffuse: hits the cap
    assert set(last[1].tolist()) - {-1} == {0, 5, 15}  # peaked: sink, the planted block, local


def test_rescored_with_every_block_a_candidate_is_the_dense_top_k():
    # beam * n_search covers the whole range: the exact rescoring sees every block, so it keeps
    # the sink, the local blocks and the n_search blocks of largest dense attention mass.
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=96, d=8, seed=11)
    query = query * 2
    block, top_k, sink, local, scale = 8, 5, 1, 1, 0.4
    chosen = rescore.rescored_estimate(query, key, query_block=block, key_block=block, top_k=top_k, sink_blocks=sink,
                                   local_blocks=local, beam=4, scale=scale)
    _, lse = dense_attention(query, key, key, scale=scale)
    mass = dense_block_mass(query, key, lse, query_block=block, key_block=block, scale=scale)
    assert_selection(chosen, brute_force_selection(mass, 96, block, block, top_k, sink, local))


def test_exact_candidate_mass_of_every_block_is_the_dense_block_mass():
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=70, seed=12)
    n_visible = visible_key_blocks(70, 16, 8)
    candidates = blocks.keep_all_rows(n_visible, 9).expand(1, 4, -1, -1)
    mass = rescore.candidate_block_mass(query, key, candidates, query_block=16, key_block=8, sink_blocks=1,
                                    local_blocks=2, estimate="exact", scale=0.3)
    _, lse = dense_attention(query, key, key, scale=0.3)
    dense = dense_block_mass(query, key, lse, query_block=16, key_block=8, scale=0.3)
    torch.testing.assert_close(mass, dense, rtol=1e-4, atol=1e-6)


def test_adaptive_with_every_block_a_candidate_keeps_the_smallest_set_reaching_p():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=128, seed=13)
    query = query * 3
    block, p, scale = 8, 0.8, 0.5
    chosen = rescore.adaptive_estimate(query, key, query_block=block, key_block=block, p=p, min_blocks=2,
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
