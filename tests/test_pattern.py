import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels.estimator_ref import stream_estimate
from sparse_lens.kernels.sparse_attention_ref import block_sparse_attention


def make_pattern(seq=100, block=16, top_k=3, keep_qk=True):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, seq, 8, generator=generator)
    key = torch.randn(1, 2, seq, 8, generator=generator)
    value = torch.randn(1, 2, seq, 8, generator=generator)
    indices = stream_estimate(query, key, query_block=block, key_block=block, top_k=top_k, sink_blocks=1, local_blocks=1)
    _, lse, mass = block_sparse_attention(query, key, value, indices, query_block=block, key_block=block, scale=0.3)
    return sl.BlockSparsePattern(indices, mass, lse, seq, block, block, 0.3, "sparse",
                                 query if keep_qk else None, key if keep_qk else None)


def test_pruned_fraction_counts_token_pairs():
    pattern = make_pattern()
    dense = pattern.to_dense()
    kept = int((dense > 0).sum())  # every kept causal pair has positive probability
    assert pattern.pruned_fraction() == pytest.approx(1 - kept / (4 * 100 * 101 / 2))
    assert int(pattern.kept_pairs().sum()) == kept


def test_to_dense_rows_sum_to_one_and_limit_is_enforced():
    pattern = make_pattern()
    torch.testing.assert_close(pattern.to_dense().sum(-1), torch.ones(1, 4, 100))
    with pytest.raises(sl.ContextTooLongError):
        pattern.to_dense(max_tokens=64)
    with pytest.raises(ValueError, match="keep_qk"):
        make_pattern(keep_qk=False).to_dense()


def test_tensor_protocol_used_by_the_cache():
    pattern = make_pattern()
    moved = pattern.detach().to("cpu").clone()
    assert isinstance(moved, sl.BlockSparsePattern) and torch.equal(moved.block_indices, pattern.block_indices)
    assert pattern.to(torch.float64).block_mass.dtype == torch.float64
    assert pattern.to(torch.float64).block_indices.dtype == torch.int64
    assert pattern.ndim == pattern.dim() == 4 and pattern.shape == (1, 4, 100, 100)
    sliced = pattern[:, :, 40:70]
    assert sliced.first_query_block == 2 and sliced.n_query_blocks == 3
    assert torch.equal(sliced.block_indices, pattern.block_indices[:, :, 2:5])
    with pytest.raises(IndexError):
        pattern[0]
    with pytest.raises(ValueError, match="sliced"):
        sliced.pruned_fraction()
    assert pattern.nbytes() < pattern.nbytes(include_qk=True)


def test_shape_mismatch_is_rejected():
    pattern = make_pattern()
    with pytest.raises(sl.ShapeError):
        sl.BlockSparsePattern(pattern.block_indices, pattern.block_mass[..., :2], pattern.lse, 100, 16, 16, 0.3)
