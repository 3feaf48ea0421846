"""The Stream estimator against brute force, structural invariants, and torch.compile."""

import pytest
import torch

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.kernels.stream import stream_estimate


def random_qk(batch=1, q_heads=4, kv_heads=2, seq=128, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, seq, d, generator=generator)
    key = torch.randn(batch, kv_heads, seq, d, generator=generator)
    return query, key


def representative_scores(query, key, query_block, key_block, representative_keys):
    """Brute force: every key block's score, as the estimator samples it (causal max of q.k)."""
    batch, q_heads, seq, _ = query.shape
    group = q_heads // key.shape[1]
    n_qb, n_kb = -(-seq // query_block), -(-seq // key_block)
    stride = key_block // representative_keys
    offset = (key_block - 1 - (representative_keys - 1) * stride) // 2
    scores = torch.full((batch, q_heads, n_qb, n_kb), float("-inf"))
    for b in range(batch):
        for h in range(q_heads):
            for j in range(n_qb):
                for kb in range(n_kb):
                    for qpos in range(j * query_block, min((j + 1) * query_block, seq)):
                        for i in range(representative_keys):
                            kpos = kb * key_block + offset + i * stride
                            if kpos <= qpos:
                                value = float(query[b, h, qpos] @ key[b, h // group, kpos])
                                scores[b, h, j, kb] = max(scores[b, h, j, kb], value)
    return scores


@pytest.mark.parametrize("representative_keys", [1, 4])
def test_matches_brute_force_top_k_when_one_round_suffices(representative_keys):
    # With at most 2 blocks per initial branch, the first round scores every block of the
    # searched range, so the estimator must return exactly the brute-force top-k.
    query_block = key_block = 4
    top_k, sink, local = 6, 1, 1
    n_search = top_k - sink - local
    seq = (2 * n_search + sink + local) * key_block  # searched range = 2 * n_search blocks at the end
    query, key = random_qk(seq=seq, seed=3)
    chosen = stream_estimate(query, key, query_block=query_block, key_block=key_block, top_k=top_k,
                             sink_blocks=sink, local_blocks=local, representative_keys=representative_keys)
    scores = representative_scores(query, key, query_block, key_block, representative_keys)
    last = chosen.shape[2] - 1
    n_visible = int(visible_key_blocks(seq, query_block, key_block)[last])
    searched = scores[:, :, last, sink : n_visible - local]
    expected = searched.topk(n_search, dim=-1).indices + sink
    for b in range(chosen.shape[0]):
        for h in range(chosen.shape[1]):
            row = set(chosen[b, h, last].tolist())
            assert row == {0, n_visible - 1} | set(expected[b, h].tolist())


def test_finds_a_planted_region_of_strong_keys():
    # Keys aligned with every query over a wide region (wider than any branch) must be found.
    query_block = key_block = 8
    seq, d = 512, 16
    query = torch.zeros(1, 2, seq, d)
    query[..., 0] = 1.0
    key = torch.randn(1, 1, seq, d) * 0.1
    key[0, 0, 200:328, 0] = 5.0  # key blocks 25..40
    chosen = stream_estimate(query, key, query_block=query_block, key_block=key_block, top_k=6,
                             sink_blocks=1, local_blocks=1)
    last_row = chosen[0, :, -1]
    searched = [b for b in last_row.flatten().tolist() if b not in (0, 63)]
    assert all(25 <= b <= 40 for b in searched), last_row


@pytest.mark.parametrize("seq,query_block,key_block", [(130, 16, 16), (100, 16, 8), (77, 8, 16), (64, 16, 16)])
def test_rows_are_sorted_unique_causal_and_full(seq, query_block, key_block):
    query, key = random_qk(batch=2, q_heads=6, kv_heads=3, seq=seq)
    top_k, sink, local = 5, 1, 2
    chosen = stream_estimate(query, key, query_block=query_block, key_block=key_block, top_k=top_k,
                             sink_blocks=sink, local_blocks=local)
    visible = visible_key_blocks(seq, query_block, key_block)
    assert chosen.shape == (2, 6, len(visible), top_k) and chosen.dtype == torch.int64
    for row_visible, rows in zip(visible.tolist(), chosen.permute(2, 0, 1, 3).reshape(len(visible), -1, top_k)):
        for row in rows.tolist():
            used = [b for b in row if b >= 0]
            assert used == sorted(set(used)), row
            assert row[len(used):] == [-1] * (top_k - len(used))
            assert all(b < row_visible for b in used)
            assert len(used) == min(top_k, row_visible)
            if row_visible > top_k:
                assert {0}.issubset(used) and {row_visible - 1, row_visible - 2}.issubset(used)


def test_gqa_query_heads_sharing_a_key_head_search_independently():
    query, key = random_qk(q_heads=4, kv_heads=1, seq=256, seed=1)
    query[:, 1] = -query[:, 0]
    chosen = stream_estimate(query, key, query_block=16, key_block=16, top_k=4, sink_blocks=0, local_blocks=1)
    assert not torch.equal(chosen[:, 0], chosen[:, 1])
    # The same query on the same key head gives the same selection.
    query[:, 2] = query[:, 0]
    again = stream_estimate(query, key, query_block=16, key_block=16, top_k=4, sink_blocks=0, local_blocks=1)
    assert torch.equal(again[:, 0], again[:, 2])


def test_rejects_bad_shapes():
    query, key = random_qk(q_heads=3, kv_heads=2)
    with pytest.raises(ShapeError):
        stream_estimate(query, key, query_block=16, key_block=16, top_k=4)
    with pytest.raises(ShapeError):
        stream_estimate(query[0], key[0], query_block=16, key_block=16, top_k=4)


def test_compiles_with_fullgraph():
    query, key = random_qk(seq=96, d=8)
    kwargs = dict(query_block=8, key_block=8, top_k=4, sink_blocks=1, local_blocks=1, representative_keys=2)
    compiled = torch.compile(stream_estimate, fullgraph=True, backend="eager")
    assert torch.equal(compiled(query, key, **kwargs), stream_estimate(query, key, **kwargs))


# ----- expanded search (expand_levels > 0): the rescored estimators' cheap candidate stage -----
def searched_blocks(row, sink, n_visible, local):
    return [block for block in row.tolist() if sink <= block < n_visible - local]


@pytest.mark.parametrize("expand_levels", [1, 2])
def test_expanded_search_contains_the_narrow_search(expand_levels):
    # The expanded search runs the narrow search's first rounds (same branches, same scores) and
    # then keeps whole branches, so the narrow search's picks lie inside them.
    query, key = random_qk(q_heads=2, kv_heads=1, seq=700, d=16, seed=3)
    budget = dict(query_block=16, key_block=16, sink_blocks=1, local_blocks=1, representative_keys=4)
    n_slots = 8
    narrow = stream_estimate(query, key, top_k=2 + (n_slots >> expand_levels), **budget)
    wide = stream_estimate(query, key, top_k=2 + n_slots, expand_levels=expand_levels, **budget)
    visible = visible_key_blocks(700, 16, 16)
    searched = visible > 2 + n_slots
    assert searched.sum() > 20
    for j in searched.nonzero().flatten().tolist():
        for h in range(2):
            assert set(narrow[0, h, j].tolist()) <= set(wide[0, h, j].tolist()), (j, h)
            found = searched_blocks(wide[0, h, j], 1, int(visible[j]), 1)
            assert n_slots >> expand_levels <= len(found) <= n_slots, (j, h, found)


def test_expanded_search_fills_an_aligned_row_with_whole_branches():
    # Last row: searched range 32 = 2 branches x 16, halved twice to 4 = 2**2 blocks: exactly two
    # aligned runs of 4 blocks; one round more or less would leave runs of 2 or 8.
    seq = 34 * 16
    query, key = random_qk(q_heads=2, kv_heads=1, seq=seq, d=16, seed=5)
    rows = stream_estimate(query, key, query_block=16, key_block=16, top_k=10, sink_blocks=1, local_blocks=1,
                           representative_keys=4, expand_levels=2)
    for h in range(2):
        row = rows[0, h, -1].tolist()
        assert row[0] == 0 and row[-1] == 33 and -1 not in row, row
        found = row[1:-1]
        runs = [found[i:i + 4] for i in (0, 4)]
        for run in runs:
            assert run == list(range(run[0], run[0] + 4)) and (run[0] - 1) % 4 == 0, row



def test_expanded_rounds_stop_at_branches_of_2_to_the_e_blocks():
    from sparse_lens.kernels.stream import expanded_rounds

    # searched range = n_visible - 2; 2 branches of ceil(range / 2) blocks, halved until <= 4
    n_visible = torch.tensor([10, 11, 18, 19, 34, 35, 1026])
    rounds = expanded_rounds(n_visible, 1, 1, 2, 2)
    assert rounds.tolist() == [0, 1, 1, 2, 2, 3, 7]
    assert expanded_rounds(n_visible, 1, 1, 2, 0).tolist() == [2, 3, 3, 4, 4, 5, 9]
