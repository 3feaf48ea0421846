"""The RMSNorm kernels against their torch references (rms_norm_ref): the tail, the squares and the
inverse RMS on them; and the references against HF's norm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.rms_norm_ref import inverse_rms, rms_norm, squares
from sparse_lens.kernels.rms_norm_triton import (
    inverse_rms_triton,
    rms_norm_triton,
    squares_triton,
)

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


def every_finite_value(dtype):
    """All finite values of a 16-bit dtype (from their 65,536 bit patterns), shuffled, as [256, 256]:
    squares from 0 and float32 subnormals (bf16's smallest) to float32 overflow (bf16's largest)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[values.isfinite()]
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(3))]
    return torch.cat([values, values[: 65536 - values.numel()]]).view(256, 256).to(DEVICE)


def same_layout(a, b):
    """Same strides on every dim longer than 1 (a stride of a dim of size 1 is never used; an empty
    tensor has no layout)."""
    return a.numel() == 0 or all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")  # the interpreter's numpy, at bf16's largest
@pytest.mark.parametrize("dtype", DTYPES)
def test_squares_equal_torch_bit_for_bit(dtype):
    """squares_triton == x.to(float32).pow(2): every finite value of the dtype (a kernel squaring in
    the 16-bit dtype, or rounding otherwise, fails), in torch's layout for each kind of input."""
    values = every_finite_value(dtype)
    expected = values.float().pow(2)
    assert expected.isinf().any() == (dtype == torch.bfloat16)  # bf16: past float32's largest
    assert torch.equal(squares_triton(values), squares(values))
    x = values[:60, :80].reshape(3, 20, 80)
    layouts = [
        x,  # contiguous
        x[:, 5:17],  # a piece of positions (inverse_rms_of_squares): not contiguous, read in place
        x.transpose(1, 2),  # dense, not contiguous: squares in its layout
        x.transpose(0, 1)[4:15],  # neither: copied to empty_like's layout first
        x[:1].expand(3, 20, 80),  # outer stride 0
        x[:, :, ::2],  # every other element
        x[1, 7], x[1, 7, 3],  # one row; 0-d
        x[:, :0],  # empty
    ]
    for layout in layouts:
        got, expected = squares_triton(layout), squares(layout)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got, expected) and same_layout(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, piece_elements, min_positions", [
    ((2, 50, 48), 500, 16),  # three pieces of a batch of two (pieces not contiguous)
    ((1, 100, 64), 1000, 8),  # seven pieces of one sequence
    ((3, 37, 40), 2**26, 1024),  # one piece
    ((5, 1), 2, 1),  # d = 1, five pieces of one row
    ((40,), 8, 1),  # 1-D: one row, one piece
])
def test_inverse_rms_triton_equals_reference_bit_for_bit(dtype, shape, piece_elements, min_positions):
    x, _, _ = inputs(shape, dtype)  # a zero row and a row of large values
    got = inverse_rms_triton(x, 1e-6, piece_elements, min_positions)
    expected = inverse_rms(x, 1e-6, piece_elements, min_positions)
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 1)
    assert torch.equal(got, expected)
    assert torch.equal(expected, inverse_rms(x, 1e-6))  # the split changes no row


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
    for function in (squares_triton, lambda x: inverse_rms_triton(x, 1e-6)):
        with pytest.raises(ShapeError):
            function(x.float())  # float32 stays on torch


def test_empty_input():
    x, scale, weight = inputs((0, 8), torch.bfloat16)
    assert rms_norm_triton(x, scale, weight).shape == (0, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's reductions: their launch depends on the rows")
@pytest.mark.parametrize("d, positions", [(1536, 43700), (3584, 18730), (8192, 8200), (16384, 4100)])
def test_pieces_of_wide_rows_are_reduced_as_the_whole_on_cuda(d, positions):
    """Just past VARIANCE_PIECE_ELEMENTS the positions split into two pieces of the fewest
    positions a split makes (half of 2**26 / d: 2,050 at d = 16384); PyTorch's CUDA reduction
    chooses its launch (blocks per row for long rows) from the number of rows, so this checks that
    every row is still summed as HF sums it on the whole tensor."""
    x = torch.randn(1, positions, d, device="cuda").to(torch.bfloat16)
    whole = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6)  # HF's operations
    assert torch.equal(inverse_rms(x, 1e-6), whole)
    assert torch.equal(inverse_rms_triton(x, 1e-6), whole)
