"""The RMSNorm tail kernel against its torch reference (rms_norm_ref), and the reference against HF's norm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.rms_norm_ref import inverse_rms, rms_norm
from sparse_lens.kernels.rms_norm_triton import rms_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1
DTYPES = [torch.bfloat16, torch.float16]


def inputs(shape, dtype, seed=0):
    """x with a zero row and a row of large values (fp16: near its largest), its inverse RMS as HF
    computes it, and a weight that is not ones (a dropped or unrounded weight shows)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3
    rows = x.view(-1, shape[-1])
    if rows.shape[0] > 2:
        rows[0] = 0.0
        rows[1] *= 4e3 if dtype == torch.float16 else 1e15  # fp16: below 65504; bf16: squares below float32's max
    x = x.to(dtype).to(DEVICE)
    weight = (torch.randn(shape[-1], generator=generator) * 0.3 + 1.0).to(dtype).to(DEVICE)
    return x, inverse_rms(x, 1e-6), weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_hf_norm(dtype):
    x, _, weight = inputs((2, 50, 48), dtype)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected = norm(x)
    assert torch.equal(rms_norm(x, inverse_rms(x, 1e-5), weight), expected)
    # in pieces of at least 16 positions (32 rows): every row reduced as on the whole tensor
    # (three pieces: min(ceil(4800 / 500), 50 // 16))
    assert torch.equal(inverse_rms(x, 1e-5, piece_elements=500, min_positions=16), inverse_rms(x, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 40), (2, 1500), (4, 3, 129), (5, 1)])
def test_kernel_equals_reference_bit_for_bit(dtype, shape):
    # (3, 37, 40): a partial last row block; (2, 1500): two column programs, the second partial;
    # (4, 3, 129): odd d, 129 in 256 lanes; (5, 1): d = 1
    x, scale, weight = inputs(shape, dtype)
    got, expected = rms_norm_triton(x, scale, weight), rms_norm(x, scale, weight)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got, expected)
    if shape[-1] > 1:  # the rounding to the dtype before the weight matters (a kernel skipping it fails)
        unrounded = (weight.float() * (x.float() * scale)).to(dtype)
        assert (unrounded != expected).float().mean() > 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_roundings_over_the_whole_range(dtype):
    """inverse_rms spread over many binades: for fp16 from 2**-40 to 2**20, so that the products
    cross its subnormals (below 6.1e-5) and its overflow to infinity (past 65504); for bf16 from
    2**-100 to 2**100 (float32's normal range: bf16 shares its exponents)."""
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 96, generator=generator) * 4).to(dtype).to(DEVICE)
    low, high = (-40, 20) if dtype == torch.float16 else (-100, 100)
    scale = torch.exp2(torch.rand(64, 1, generator=generator) * (high - low) + low)
    # rows scaled by powers of two: x * scale exact, and for fp16 often a tie between two subnormals
    scale[:16] = torch.exp2(torch.randint(-30, -16, (16, 1), generator=generator).float())
    scale = scale.to(DEVICE)
    weight = (torch.rand(96, generator=generator) * 2 + 0.1).to(dtype).to(DEVICE)
    got, expected = rms_norm_triton(x, scale, weight), rms_norm(x, scale, weight)
    if dtype == torch.float16:  # subnormal and infinite outputs were checked
        assert (expected.abs() < torch.finfo(dtype).tiny).logical_and(expected != 0).any()
        assert expected.isinf().any()
    assert torch.equal(got, expected)


def test_bad_inputs_raise():
    x, scale, weight = inputs((4, 8), torch.bfloat16)
    bad = [
        (x.float(), scale, weight.float()),  # float32 stays on the torch path
        (x.t().contiguous().t(), scale, weight),  # not contiguous
        (x, scale, weight.half()),  # weight of another dtype
        (x, scale, weight[:4]),  # weight not [d]
        (x, scale.double(), weight),  # inverse_rms not float32
        (x, scale[:2], weight),  # inverse_rms not one per row
        (x, scale.squeeze(-1), weight),  # inverse_rms without its last dim of 1
    ]
    for arguments in bad:
        with pytest.raises(ShapeError):
            rms_norm_triton(*arguments)


def test_empty_input():
    x, scale, weight = inputs((0, 8), torch.bfloat16)
    assert rms_norm_triton(x, scale, weight).shape == (0, 8)
