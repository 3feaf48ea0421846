"""Block-sparse and chunked dense attention against a plain masked softmax."""

import math

import pytest
import torch

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.kernels.dense import dense_attention, dense_block_mass
from sparse_lens.kernels.sparse_attention import (
    block_sparse_attention,
    kept_block_mass,
    kept_token_probs,
)


def qkv(batch=2, q_heads=4, kv_heads=2, seq=75, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(batch, heads, seq, d, generator=generator)  # noqa: E731
    return make(q_heads), make(kv_heads), make(kv_heads)


def token_mask(block_indices, seq, query_block, key_block):
    """Dense [batch, head, seq, seq] bool mask of kept, causal query-key pairs."""
    batch, heads = block_indices.shape[:2]
    mask = torch.zeros(batch, heads, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for row in range(block_indices.shape[2]):
                for block in block_indices[b, h, row].tolist():
                    if block >= 0:
                        mask[b, h, row * query_block:(row + 1) * query_block, block * key_block:(block + 1) * key_block] = True
    return mask & torch.ones(seq, seq, dtype=torch.bool).tril()


def masked_softmax_reference(query, key, value, mask, scale):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ value, lse, probs


def random_block_indices(batch, heads, seq, query_block, key_block, top_k, seed=0, keep_diagonal=True):
    generator = torch.Generator().manual_seed(seed)
    visible = visible_key_blocks(seq, query_block, key_block)
    block_indices = torch.full((batch, heads, len(visible), top_k), -1)
    for b in range(batch):
        for h in range(heads):
            for row, n_visible in enumerate(visible.tolist()):
                chosen = torch.randperm(n_visible, generator=generator)[:top_k]
                if keep_diagonal and (n_visible - 1) not in chosen.tolist():
                    chosen[-1] = n_visible - 1
                block_indices[b, h, row, : len(chosen)] = chosen.sort().values
    return block_indices


@pytest.mark.parametrize("seq,query_block,key_block,top_k", [(75, 8, 8, 3), (64, 16, 4, 5), (50, 4, 16, 2), (33, 8, 8, 1)])
def test_block_sparse_matches_masked_softmax(seq, query_block, key_block, top_k):
    query, key, value = qkv(seq=seq)
    scale = 0.3
    block_indices = random_block_indices(2, 4, seq, query_block, key_block, top_k)
    out, lse, mass = block_sparse_attention(query, key, value, block_indices, query_block=query_block,
                                            key_block=key_block, scale=scale)
    mask = token_mask(block_indices, seq, query_block, key_block)
    ref_out, ref_lse, ref_probs = masked_softmax_reference(query, key, value, mask, scale)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # block mass: probability of each kept block, averaged over the block's real queries
    expected_mass = torch.zeros_like(mass)
    for b, h, row, slot in torch.cartesian_prod(*(torch.arange(n) for n in block_indices.shape)).tolist():
        block = int(block_indices[b, h, row, slot])
        if block >= 0:
            queries = slice(row * query_block, min((row + 1) * query_block, seq))
            keys = slice(block * key_block, (block + 1) * key_block)
            expected_mass[b, h, row, slot] = ref_probs[b, h, queries, keys].sum(-1).mean()
    torch.testing.assert_close(mass, expected_mass, atol=1e-5, rtol=1e-5)


def test_gate_scales_each_block_in_the_output_only():
    query, key, value = qkv(seq=48)
    block_indices = random_block_indices(2, 4, 48, 8, 8, 3)
    gate = torch.rand(block_indices.shape, generator=torch.Generator().manual_seed(1))
    out, lse, mass = block_sparse_attention(query, key, value, block_indices, query_block=8, key_block=8, scale=0.5, block_gate=gate)
    _, lse_plain, mass_plain = block_sparse_attention(query, key, value, block_indices, query_block=8, key_block=8, scale=0.5)
    torch.testing.assert_close(lse, lse_plain)
    torch.testing.assert_close(mass, mass_plain)
    # Brute force: scale probabilities per kept block before the value product.
    mask = token_mask(block_indices, 48, 8, 8)
    _, _, probs = masked_softmax_reference(query, key, value, mask, 0.5)
    token_gate = torch.zeros_like(probs)
    for row in range(block_indices.shape[2]):
        for slot in range(3):
            block = block_indices[:, :, row, slot]
            for b in range(2):
                for h in range(4):
                    if block[b, h] >= 0:
                        k0 = int(block[b, h]) * 8
                        token_gate[b, h, row * 8:(row + 1) * 8, k0:k0 + 8] = gate[b, h, row, slot]
    expected = (probs * token_gate) @ value.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_query_seeing_no_kept_key_gets_zero_output():
    query, key, value = qkv(batch=1, q_heads=2, kv_heads=1, seq=32)
    block_indices = torch.full((1, 2, 2, 1), -1)
    block_indices[:, :, 1, 0] = 3  # query block 1 (positions 16..31) keeps key block 3 (24..31) only
    out, lse, _ = block_sparse_attention(query, key, value, block_indices, query_block=16, key_block=8, scale=1.0)
    assert torch.all(out[:, :, :24] == 0) and torch.all(torch.isinf(lse[:, :, :24]))
    assert torch.isfinite(out).all() and torch.all(out[:, :, 24:].abs().sum(-1) > 0)


def test_dense_attention_and_block_mass_match_reference():
    query, key, value = qkv(seq=70)
    out, lse = dense_attention(query, key, value, scale=0.4, query_chunk=16)
    mask = torch.ones(70, 70, dtype=torch.bool).tril().expand(2, 4, 70, 70)
    ref_out, ref_lse, ref_probs = masked_softmax_reference(query, key, value, mask, 0.4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    mass = dense_block_mass(query, key, lse, query_block=16, key_block=8, scale=0.4)
    expected = torch.nn.functional.pad(ref_probs, (0, 2, 0, 10)).unflatten(-1, (9, 8)).sum(-1).unflatten(2, (5, 16)).sum(3)
    expected = expected / torch.tensor([16, 16, 16, 16, 6.0])[:, None]
    torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-5)
    block_indices = random_block_indices(2, 4, 70, 16, 8, 3)
    kept = kept_block_mass(query, key, block_indices, lse, query_block=16, key_block=8, scale=0.4)
    gathered = mass.gather(-1, block_indices.clamp(min=0)) * (block_indices >= 0)
    torch.testing.assert_close(kept, gathered, atol=1e-5, rtol=1e-5)
    dense = kept_token_probs(query, key, block_indices, lse, query_block=16, key_block=8, scale=0.4)
    torch.testing.assert_close(dense, ref_probs * token_mask(block_indices, 70, 16, 8), atol=1e-6, rtol=1e-5)


def test_dense_attention_with_cached_prefix_equals_the_tail_of_a_full_pass():
    query, key, value = qkv(seq=40)
    full, _ = dense_attention(query, key, value, scale=0.5)
    tail, _ = dense_attention(query[:, :, -3:], key, value, scale=0.5, query_offset=37)
    torch.testing.assert_close(tail, full[:, :, -3:])


def test_bad_inputs_raise_shape_errors():
    query, key, value = qkv(seq=32)
    good = random_block_indices(2, 4, 32, 8, 8, 2)
    with pytest.raises(ShapeError):
        block_sparse_attention(query, key, value, good[:, :, :2], query_block=8, key_block=8, scale=1.0)
    with pytest.raises(ShapeError):
        block_sparse_attention(query, key, value, good.float(), query_block=8, key_block=8, scale=1.0)
    with pytest.raises(ShapeError):
        block_sparse_attention(query, key[:, :, :16], value, good, query_block=8, key_block=8, scale=1.0)
