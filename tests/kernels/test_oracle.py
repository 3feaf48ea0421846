"""The exact top-k oracle, streamed over query blocks, against brute force on the whole mass matrix."""

from __future__ import annotations

import os

import pytest
import torch

from sparse_lens.kernels import block_mass_rows, oracle_blocks
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.kernels.dense import block_mass_rows as block_mass_rows_reference
from sparse_lens.kernels.dense import dense_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
SEQ = 150  # a partial last block


def _qk_lse(seq_len=SEQ, heads=4, kv_heads=2, d_head=16, scale=0.4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    query = (torch.randn(1, heads, seq_len, d_head, generator=generator) * 2).to(DEVICE, dtype)
    key = (torch.randn(1, kv_heads, seq_len, d_head, generator=generator) * 2).to(DEVICE, dtype)
    _, lse = dense_attention(query, key, key, scale=scale)
    return query, key, lse


def _brute_force_block_mass(query, key, lse, query_block, key_block, scale):
    """Token-level dense probabilities, summed per (query block, key block), mean over queries."""
    seq_len = query.shape[2]
    keys = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), keys) * scale
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).tril()
    probs = torch.where(causal, torch.exp(scores - lse[..., None]), 0.0)
    n_qb, n_kb = -(-seq_len // query_block), -(-seq_len // key_block)
    mass = torch.zeros(*query.shape[:2], n_qb, n_kb, device=query.device)
    for row in range(n_qb):
        rows = probs[:, :, row * query_block : (row + 1) * query_block]
        for column in range(n_kb):
            mass[:, :, row, column] = rows[..., column * key_block : (column + 1) * key_block].sum((-1, -2)) / rows.shape[2]
    return mass


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_block_mass_rows_equal_brute_force(blocks, backend):
    query_block, key_block = blocks
    query, key, lse = _qk_lse()
    expected = _brute_force_block_mass(query, key, lse, query_block, key_block, 0.4)
    rows = torch.tensor([0, 2, 3, expected.shape[2] - 1])
    mass = block_mass_rows(query, key, lse, rows, query_block=query_block, key_block=key_block, scale=0.4,
                           backend=backend)
    torch.testing.assert_close(mass, expected[:, :, rows], atol=1e-5, rtol=1e-5)
    early = block_mass_rows(query, key, lse, rows[:2], query_block=query_block, key_block=key_block, scale=0.4,
                            backend=backend)
    assert early.shape[-1] == visible_key_blocks(SEQ, query_block, key_block)[2]  # as wide as row 2 sees


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_reference_block_mass_rows_by_one_query_block_at_a_time(blocks, monkeypatch):
    """One query block per chunk: each chunk scores only the keys its rows can see (the trim), and
    the rows still equal brute force, zeros past what a row sees included."""
    import sparse_lens.kernels.dense as dense

    query_block, key_block = blocks
    query, key, lse = _qk_lse()
    expected = _brute_force_block_mass(query, key, lse, query_block, key_block, 0.4)
    monkeypatch.setattr(dense, "query_blocks_per_chunk", lambda _: 1)
    rows = torch.tensor([0, 1, 3, expected.shape[2] - 1])
    mass = block_mass_rows_reference(query, key, lse, rows, query_block=query_block, key_block=key_block, scale=0.4)
    torch.testing.assert_close(mass, expected[:, :, rows], atol=1e-5, rtol=1e-5)


def test_block_mass_rows_triton_bf16_close_to_the_reference():
    query, key, lse = _qk_lse(dtype=torch.bfloat16)
    rows = torch.arange(10)
    expected = block_mass_rows_reference(query, key, lse, rows, query_block=16, key_block=16, scale=0.4)
    mass = block_mass_rows(query, key, lse, rows, query_block=16, key_block=16, scale=0.4, backend="triton")
    torch.testing.assert_close(mass, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_oracle_keeps_the_top_k_blocks_by_dense_mass(backend):
    query, key, lse = _qk_lse()
    top_k = 3
    mass = _brute_force_block_mass(query, key, lse, 16, 16, 0.4)
    # chunk_bytes small enough for one query block per chunk: the streaming is exercised
    indices, kept = oracle_blocks(query, key, lse, query_block=16, key_block=16, top_k=top_k, scale=0.4,
                                  backend=backend, chunk_bytes=1)
    torch.testing.assert_close(kept.sum(-1), mass.topk(top_k, dim=-1).values.sum(-1), atol=1e-5, rtol=1e-5)
    visible = visible_key_blocks(SEQ, 16, 16)
    for row in range(mass.shape[2]):
        used = indices[0, 0, row][indices[0, 0, row] >= 0]
        assert len(used) == min(top_k, int(visible[row]))  # -1 only where the row sees fewer blocks
        assert (used.diff() > 0).all()  # ascending
        assert (indices[0, 0, row, len(used):] == -1).all()
        torch.testing.assert_close(kept[0, 0, row, : len(used)], mass[0, 0, row, used], atol=1e-5, rtol=1e-5)
    sampled_indices, sampled = oracle_blocks(query, key, lse, query_block=16, key_block=16, top_k=top_k, scale=0.4,
                                             rows=torch.tensor([1, 7]), backend=backend)
    torch.testing.assert_close(sampled, kept[:, :, [1, 7]])
    assert torch.equal(sampled_indices, indices[:, :, [1, 7]])
