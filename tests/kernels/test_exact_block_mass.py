"""dense_block_masses: one pass, every block size equal to dense_block_mass at that size."""

import pytest
import torch

from sparse_lens.errors import BlockSizeError
from sparse_lens.kernels.dense import dense_attention, dense_block_mass
from sparse_lens.kernels.exact_block_mass import dense_block_masses
from tests.kernels.estimator_cases import random_qk


@pytest.mark.parametrize("seq", [96, 90])  # 90: partial last blocks at every size
def test_every_size_equals_the_single_size_reference(seq):
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=seq, d=8, seed=3)
    value = torch.randn_like(key)
    _, lse = dense_attention(query, key, value, scale=0.4)
    masses = dense_block_masses(query, key, lse, [8, 16, 32], scale=0.4, backend="reference")
    for block in (8, 16, 32):
        expected = dense_block_mass(query, key, lse, query_block=block, key_block=block, scale=0.4)
        torch.testing.assert_close(masses[block], expected, rtol=1e-5, atol=1e-6)
        # each row of causal masses sums to 1
        torch.testing.assert_close(masses[block].sum(-1), torch.ones_like(masses[block].sum(-1)), rtol=1e-4, atol=1e-5)


def test_rejects_sizes_that_do_not_pool():
    query, key = random_qk(seq=64)
    lse = torch.zeros(query.shape[:3])
    with pytest.raises(BlockSizeError):
        dense_block_masses(query, key, lse, [8, 12], scale=1.0)
    with pytest.raises(BlockSizeError):
        dense_block_masses(query, key, lse, [], scale=1.0)
