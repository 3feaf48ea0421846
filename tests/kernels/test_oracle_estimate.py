"""The ``oracle`` estimator: sink + local blocks plus the exact top blocks by dense block mass.

Checked against a brute force over the whole [T, T] probability matrix, and, in a tiny model,
against every other estimator: no estimator keeping the same fixed blocks can recall more.
"""

from __future__ import annotations

import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels import ESTIMATORS, estimate_blocks, lagged_selection
from sparse_lens.kernels.causal import causal_inner_budget
from sparse_lens.kernels.oracle_estimate import oracle_estimate
from tests.conftest import sparse_and_dense, tiny_llama_config
from tests.kernels.estimator_cases import check_rows, random_qk


def brute_force_oracle(query, key, *, query_block, key_block, top_k, sink_blocks, local_blocks, scale):
    """Dense softmax over the full [T, T] scores, block masses by loops, fixed + top searchable blocks."""
    batch, n_heads, seq, _ = query.shape
    keys = key.double().repeat_interleave(n_heads // key.shape[1], dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query.double(), keys) * scale
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    n_qb, n_kb = -(-seq // query_block), -(-seq // key_block)
    out = torch.full((batch, n_heads, n_qb, top_k), -1, dtype=torch.int64)
    for b in range(batch):
        for h in range(n_heads):
            for row in range(n_qb):
                q_rows = probs[b, h, row * query_block : (row + 1) * query_block]
                n_visible = -(-min((row + 1) * query_block, seq) // key_block)
                if n_visible <= top_k:
                    out[b, h, row, :n_visible] = torch.arange(n_visible)
                    continue
                mass = [float(q_rows[:, c * key_block : (c + 1) * key_block].sum()) for c in range(n_kb)]
                fixed = set(range(sink_blocks)) | set(range(n_visible - local_blocks, n_visible))
                searchable = sorted((c for c in range(sink_blocks, n_visible - local_blocks)), key=lambda c: -mass[c])
                kept = sorted(fixed | set(searchable[: top_k - len(fixed)]))
                out[b, h, row] = torch.tensor(kept)
    return out


@pytest.mark.parametrize("seq,query_block,key_block,top_k,sink,local", [
    (150, 16, 16, 5, 1, 1),  # partial last block
    (160, 32, 16, 6, 1, 2),  # query blocks larger than key blocks
    (150, 8, 16, 4, 1, 1),   # key blocks larger than query blocks
    (128, 16, 16, 4, 0, 0),  # nothing fixed
])
def test_blocks_equal_a_brute_force_top_k_of_the_dense_block_masses(seq, query_block, key_block, top_k, sink, local):
    query, key = random_qk(batch=2, q_heads=4, kv_heads=2, seq=seq, d=8, seed=5)
    query = query * 2  # peaked attention: masses far apart, no near-ties
    budget = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink, local_blocks=local)
    chosen = oracle_estimate(query, key, scale=0.5, backend="reference", **budget)
    assert torch.equal(chosen, brute_force_oracle(query, key, scale=0.5, **budget))
    assert torch.equal(estimate_blocks(query, key, estimator="oracle", scale=0.5, backend="reference", **budget), chosen)
    check_rows(chosen, seq, query_block, key_block, top_k, sink, local,
               lambda n_visible, used: len(used) == min(top_k, n_visible))


def test_default_scale_is_one_over_sqrt_d_head_and_the_fused_path_agrees():
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=144, d=16, seed=6)
    budget = dict(query_block=16, key_block=16, top_k=4, sink_blocks=1, local_blocks=1)
    expected = brute_force_oracle(query, key, scale=16**-0.5, **budget)
    assert torch.equal(oracle_estimate(query, key, backend="reference", **budget), expected)
    assert torch.equal(oracle_estimate(query, key, backend="auto", **budget), expected)  # SDPA lse on the CPU


def test_causal_oracle_is_the_lagged_selection_of_the_oracle_rows():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=128, seed=7)
    budget = dict(query_block=16, key_block=16, sink_blocks=1, local_blocks=1)
    inner = causal_inner_budget(top_k=5, min_blocks=1, **budget)
    rows = oracle_estimate(query, key, top_k=inner["top_k"], **{**budget, "local_blocks": inner["local_blocks"]})
    expected = lagged_selection(rows, seq_len=128, query_block=16, key_block=16, top_k=5)
    assert torch.equal(estimate_blocks(query, key, estimator="oracle", top_k=5, causal=True, **budget), expected)


def test_model_run_with_the_oracle_recalls_at_least_every_other_estimator():
    """Same budget, same fixed blocks, non-causal selection (each query block picks its own rows):
    the oracle's recall is the per-row maximum, so its mean is >= every estimator's."""
    tokens = torch.randint(0, 90, (1, 192), generator=torch.Generator().manual_seed(4))
    budget = dict(query_block=16, key_block=16, top_k=4, sink_blocks=1, local_blocks=1, causal_selection=False,
                  min_blocks=2, top_p=0.7)
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(estimator="oracle", **budget))
    dense = sl.collect_dense(sparse, tokens)
    recall = {name: sl.fidelity(sparse, tokens, sl.StreamConfig(estimator=name, **budget), dense=dense)["mass_recall_mean"]
              for name in ESTIMATORS}
    others = {name: value for name, value in recall.items() if name != "oracle"}
    assert all(recall["oracle"] >= value - 1e-6 for value in others.values()), recall
    assert recall["oracle"] > min(others.values()) + 1e-3, recall  # the budget really prunes: estimators differ
