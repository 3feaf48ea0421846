"""Lagged (strictly causal) selection: the row transformation by hand, and causality of every estimator."""

import pytest
import torch

from sparse_lens.kernels import ESTIMATORS, estimate_blocks, lagged_selection
from sparse_lens.kernels.causal import band_blocks, causal_inner_budget
from tests.kernels.estimator_cases import check_rows, random_qk


def test_rows_are_the_previous_row_plus_the_band():
    # 6 query blocks of 16 tokens, key blocks of 16, top_k 3: the inner estimator ran with top_k 2.
    inner = torch.tensor([[0, -1], [0, 1], [0, 1], [0, 2], [1, 3], [0, 4]])
    rows = lagged_selection(inner, seq_len=96, query_block=16, key_block=16, top_k=3)
    assert rows.tolist() == [
        [0, -1, -1],  # rows that see <= top_k blocks keep them all, -1 padded
        [0, 1, -1],
        [0, 1, 2],
        [0, 1, 3],  # inner row 2 + band 3; nothing from inner row 3 (it read queries of row 3)
        [0, 2, 4],
        [1, 3, 5],
    ]


def test_unsorted_inner_rows_duplicates_and_padding():
    inner = torch.tensor([[[-1, 0], [1, 0], [1, -1], [3, 0], [-1, 4], [4, 0]]])  # any order, -1 anywhere
    rows = lagged_selection(inner, seq_len=96, query_block=16, key_block=16, top_k=3)
    # row 3: inner row 2 = {1} + band 3; row 4: inner row 3 = {0, 3} + band 4; row 5: inner row 4 = {4} + band 5
    assert rows[0, 3:].tolist() == [[1, 3, -1], [0, 3, 4], [4, 5, -1]]
    # an inner row naming a band block (an edited or malformed row) is counted once
    inner = torch.tensor([[0, -1], [0, 1], [0, 1], [0, 2], [0, 5], [0, 4]])
    assert lagged_selection(inner, seq_len=96, query_block=16, key_block=16, top_k=3)[5].tolist() == [0, 5, -1]


def test_small_key_blocks_keep_every_key_block_of_the_band():
    # query blocks of 32 = 2 key blocks of 16; T = 100 -> 4 query blocks, the last one partial (2 real key blocks: 6)
    inner = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 5]])
    rows = lagged_selection(inner, seq_len=100, query_block=32, key_block=16, top_k=4)
    assert rows.tolist() == [[0, 1, -1, -1], [0, 1, 2, 3], [0, 2, 4, 5], [0, 3, 6, -1]]


def test_large_key_blocks_lag_to_the_last_query_block_before_the_band():
    # key blocks of 32 = 2 query blocks of 16: query blocks 6 and 7 share key block 3, so both use row 5
    inner = torch.tensor([[0, -1]] * 4 + [[0, 1], [0, 2], [1, 2], [1, 3]])
    rows = lagged_selection(inner, seq_len=128, query_block=16, key_block=32, top_k=3)
    assert rows[6].tolist() == [0, 2, 3] and rows[7].tolist() == [0, 2, 3]
    assert rows[:6].tolist() == [[0, -1, -1]] * 2 + [[0, 1, -1]] * 2 + [[0, 1, 2]] * 2


def test_budget_bound_and_inner_budget():
    assert band_blocks(64, 16) == 4 and band_blocks(16, 64) == 1 and band_blocks(64, 64) == 1
    inner = causal_inner_budget(query_block=64, key_block=16, top_k=16, sink_blocks=1, local_blocks=1, min_blocks=6)
    assert inner == {"top_k": 12, "local_blocks": 0, "min_blocks": 2}
    inner = causal_inner_budget(query_block=16, key_block=16, top_k=8, sink_blocks=1, local_blocks=3, min_blocks=1)
    assert inner == {"top_k": 7, "local_blocks": 2, "min_blocks": 1}
    with pytest.raises(ValueError, match="top_k=4 must be at least 5"):
        causal_inner_budget(query_block=64, key_block=16, top_k=4, sink_blocks=0, local_blocks=0, min_blocks=1)
    with pytest.raises(ValueError, match="exceed top_k"):
        lagged_selection(torch.zeros(6, 3, dtype=torch.int64), seq_len=96, query_block=16, key_block=16, top_k=3)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("seq,query_block,key_block,top_k", [(130, 16, 16, 4), (128, 32, 16, 5), (120, 8, 16, 3)])
def test_every_estimator_chooses_from_earlier_tokens_only(estimator, seq, query_block, key_block, top_k):
    """Perturbing q and k after position p leaves the rows of every query block holding a position <= p."""
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=seq)
    kwargs = dict(estimator=estimator, query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=1,
                  local_blocks=1, min_blocks=2, top_p=0.7, representative_keys=4, backend="reference", causal=True)
    rows = estimate_blocks(query, key, **kwargs)
    check_rows(rows, seq, query_block, key_block, top_k, 1, max(1, band_blocks(query_block, key_block)),
               lambda n_visible, used: len(used) <= top_k)
    generator = torch.Generator().manual_seed(1)
    for p in (40, 71, seq - 20):
        changed_q, changed_k = query.clone(), key.clone()
        changed_q[:, :, p + 1:] = 5 * torch.randn(changed_q[:, :, p + 1:].shape, generator=generator)
        changed_k[:, :, p + 1:] = 5 * torch.randn(changed_k[:, :, p + 1:].shape, generator=generator)
        served = p // query_block + 1  # query blocks holding a position <= p
        assert torch.equal(estimate_blocks(changed_q, changed_k, **kwargs)[:, :, :served], rows[:, :, :served]), p


@pytest.mark.parametrize("estimator", ["rescored", "stream"])
def test_without_causal_selection_later_tokens_steer_earlier_rows(estimator):
    """The check above fails with the old selection, so it can catch the bug."""
    seq, query_block = 130, 16
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=seq)
    kwargs = dict(estimator=estimator, query_block=query_block, key_block=16, top_k=4, sink_blocks=1, local_blocks=1,
                  representative_keys=4, backend="reference", causal=False)
    rows = estimate_blocks(query, key, **kwargs)
    generator = torch.Generator().manual_seed(1)
    steered = 0
    for p in range(65, seq - 1, 16):  # the first query of each block from the 5th on: later queries change
        changed_q = query.clone()
        changed_q[:, :, p + 1:] = 5 * torch.randn(changed_q[:, :, p + 1:].shape, generator=generator)
        served = p // query_block + 1
        steered += not torch.equal(estimate_blocks(changed_q, key, **kwargs)[:, :, :served], rows[:, :, :served])
    assert steered > 0


def test_triton_two_kernel_rescoring_is_causal_too():
    """The rescored estimator's Triton path (Stream kernel + fused rescoring): on the GPU when there
    is one, else under the CPU interpreter (where it also equals the torch path exactly)."""
    interpreted = not torch.cuda.is_available()
    query, key = (t.to("cpu" if interpreted else "cuda") for t in random_qk(batch=1, q_heads=2, kv_heads=1, seq=96, d=16))
    kwargs = dict(estimator="rescored", query_block=16, key_block=16, top_k=4, sink_blocks=1, local_blocks=1,
                  representative_keys=4, backend="triton", causal=True)
    rows = estimate_blocks(query, key, **kwargs)
    if interpreted:  # on the GPU, float rounding may break near-ties differently from the torch path
        assert torch.equal(rows, estimate_blocks(query, key, **{**kwargs, "backend": "reference"}))
    changed_q, changed_k = query.clone(), key.clone()
    changed_q[:, :, 50:], changed_k[:, :, 50:] = 3.0, -3.0
    assert torch.equal(estimate_blocks(changed_q, changed_k, **kwargs)[:, :, :4], rows[:, :, :4])
