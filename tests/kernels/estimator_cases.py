"""Shared fixtures of the estimator tests: random q / k, row checks, brute-force selection."""

import os
import secrets

import pytest
import torch

from sparse_lens.kernels.blocks import visible_key_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test; replay one with ``SPARSE_LENS_SEED=<seed>``."""
    return int(os.environ.get("SPARSE_LENS_SEED", secrets.randbelow(2**31)))


def device_qk(seed, *, batch=1, q_heads=4, kv_heads=2, seq=200, d=16, dtype=torch.float32, head_major=True):
    """Random q, k on DEVICE; ``head_major=False`` returns strided views of [batch, seq, head, d] storage."""
    generator = torch.Generator().manual_seed(seed)

    def make(heads):
        if head_major:
            return torch.randn(batch, heads, seq, d, generator=generator).to(DEVICE, dtype)
        return torch.randn(batch, seq, heads, d, generator=generator).to(DEVICE, dtype).transpose(1, 2)

    return make(q_heads), make(kv_heads)


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
