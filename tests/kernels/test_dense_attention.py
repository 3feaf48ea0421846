"""Dense attention with its lse on torch's fused SDPA kernels, and kept-block masses on Triton,
against the chunked torch references.

On the CPU the fused path is torch's CPU flash kernel and the Triton kernel runs under the
interpreter (tests/conftest.py); on a GPU the same tests run the CUDA kernels, and
``test_every_cuda_backend_matches_the_reference`` checks flash, cuDNN and efficient attention
one by one (skipped on the CPU: those kernels exist only on CUDA).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparse_lens.kernels as kernels
from sparse_lens.errors import BlockSizeError, ShapeError
from sparse_lens.kernels.block_mass_triton import kept_block_mass_triton
from sparse_lens.kernels.dense import dense_attention as dense_reference
from sparse_lens.kernels.dense_sdpa import dense_attention_sdpa, fused_backend, normalise_lse
from sparse_lens.kernels.sparse_attention import kept_block_mass

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def _qkv(seq_len=150, heads=4, kv_heads=2, d_head=32, dtype=torch.float32, seed=0, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda h: torch.randn(1, h, seq_len, d_head, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    return draw(heads) * 2.0, draw(kv_heads) * 2.0, draw(kv_heads)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_fused_dense_attention_equals_the_reference_with_gqa(kv_heads):
    query, key, value = _qkv(kv_heads=kv_heads, dtype=torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    assert fused_backend(query, key, value, scale=0.3) is not None
    output, lse = dense_attention_sdpa(query, key, value, scale=0.3)
    ref_output, ref_lse = dense_reference(query.float(), key.float(), value.float(), scale=0.3)
    assert lse.shape == (1, 4, 150) and lse.dtype == torch.float32
    tolerance = 1e-5 if query.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(output.float(), ref_output, atol=tolerance, rtol=tolerance)


def test_scale_reaches_the_fused_kernel():
    on_cuda = DEVICE == "cuda"  # CUDA's fused kernels take half precision only
    query, key, value = _qkv(dtype=torch.bfloat16 if on_cuda else torch.float32)
    tolerance = 2e-2 if on_cuda else 1e-5
    _, lse_a = dense_attention_sdpa(query, key, value, scale=0.3)
    _, lse_b = dense_reference(query.float(), key.float(), value.float(), scale=0.6)
    _, lse_c = dense_attention_sdpa(query, key, value, scale=0.6)
    assert not torch.allclose(lse_a, lse_b, atol=10 * tolerance)
    torch.testing.assert_close(lse_c, lse_b, atol=tolerance, rtol=tolerance)


def test_dispatch_routes_decode_and_reference_to_the_chunked_reference():
    query, key, value = _qkv(seq_len=40)
    full, _ = kernels.dense_attention(query, key, value, scale=0.5)
    tail, _ = kernels.dense_attention(query[:, :, -3:], key, value, scale=0.5, query_offset=37)
    torch.testing.assert_close(tail, full[:, :, -3:], atol=1e-5, rtol=1e-5)
    reference, _ = kernels.dense_attention(query, key, value, scale=0.5, backend="reference")
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError):
        dense_attention_sdpa(query[:, :, -3:], key, value, scale=0.5, query_offset=37)


def test_normalise_lse_handles_every_backend_layout():
    lse = torch.randn(2, 3, 10)
    torch.testing.assert_close(normalise_lse(lse[..., None], 2, 3, 10), lse)  # cuDNN: trailing 1
    torch.testing.assert_close(normalise_lse(torch.cat([lse, lse[..., :6]], -1), 2, 3, 10), lse)  # padded
    with pytest.raises(ShapeError):
        normalise_lse(lse[..., :9], 2, 3, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash / cuDNN / efficient SDPA kernels exist only on CUDA")
def test_every_cuda_backend_matches_the_reference():
    query, key, value = _qkv(seq_len=1000, heads=6, kv_heads=2, d_head=128, dtype=torch.bfloat16, device="cuda")
    _, ref_lse = dense_reference(query.float(), key.float(), value.float(), scale=0.1)
    ref_output, _ = dense_reference(query, key, value, scale=0.1)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel(backend):
            if fused_backend(query, key, value, scale=0.1) != backend:
                continue  # not available for these tensors on this machine
            output, lse = dense_attention_sdpa(query, key, value, scale=0.1)
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2, msg=str(backend))
        torch.testing.assert_close(output.float(), ref_output.float(), atol=2e-2, rtol=2e-2, msg=str(backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_kept_block_mass_triton_equals_the_reference(blocks, dtype):
    query_block, key_block = blocks
    query, key, _ = _qkv(seq_len=100, d_head=24, dtype=dtype)  # 100: a partial last block
    _, lse = dense_reference(query, key, key, scale=0.25)
    n_query_blocks, n_key_blocks = -(-100 // query_block), -(-100 // key_block)
    generator = torch.Generator().manual_seed(1)
    block_indices = torch.randint(0, n_key_blocks, (1, 4, n_query_blocks, 3), generator=generator)
    block_indices[..., -1] = -1  # an unused slot
    block_indices[0, 0, 0] = torch.tensor([0, n_key_blocks - 1, -1])  # a block after every query of the row
    block_indices = block_indices.to(DEVICE)
    mass = kept_block_mass_triton(query, key, block_indices, lse, query_block=query_block, key_block=key_block,
                                  scale=0.25)
    expected = kept_block_mass(query, key, block_indices, lse, query_block=query_block, key_block=key_block,
                               scale=0.25)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(mass, expected, atol=tolerance, rtol=tolerance)
    assert (mass[..., -1] == 0).all() and mass[0, 0, 0, 1] == 0


def test_kept_block_masses_of_all_blocks_sum_to_one():
    """Keeping every visible block recovers the whole dense mass: each row sums to 1."""
    query, key, _ = _qkv(seq_len=64)
    _, lse = dense_reference(query, key, key, scale=0.4)
    every_block = torch.arange(4).expand(1, 4, 4, 4).to(DEVICE)
    mass = kernels.kept_block_mass(query, key, every_block, lse, query_block=16, key_block=16, scale=0.4,
                                   backend="triton")
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 4, 4, device=DEVICE), atol=1e-5, rtol=1e-5)


def test_triton_block_mass_rejects_unsupported_block_sizes():
    query, key, _ = _qkv(seq_len=48)
    _, lse = dense_reference(query, key, key, scale=0.4)
    with pytest.raises(BlockSizeError):
        kept_block_mass_triton(query, key, torch.zeros(1, 4, 4, 2, dtype=torch.long), lse,
                               query_block=12, key_block=12, scale=0.4)
