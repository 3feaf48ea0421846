"""The rounding helpers of the RoPE, SiLU-and-product and RMSNorm kernels (rounding.round_to_bf16,
rounding.round_to_fp16) against torch's float32 -> bf16 / fp16 casts (round to nearest, ties to
even), special values included."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_lens.kernels.rounding import round_to_bf16, round_to_fp16

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(out_ptr + offsets, round_to_bf16(tl.load(x_ptr + offsets, mask=inside, other=0.0)), mask=inside)


def rounded(values: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(values)
    _round_kernel[(1,)](values, out, values.numel(), BLOCK=triton.next_power_of_2(values.numel()))
    return out


def from_bits(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_rounds_as_the_cast_does():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(200, generator=generator) * 10.0 ** torch.randint(-30, 30, (200,), generator=generator),
        from_bits(0x3F808000, 0x3F818000, 0x3F807FFF, 0x00000001, 0x807FFFFF),  # ties to even both ways, subnormals
        torch.tensor([0.0, -0.0, 3.3895314e38, torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max,
                      float("inf"), float("-inf")]),  # the largest ones round to infinity, as the cast
    ]).to(DEVICE)
    got = rounded(values)
    assert torch.equal(got.view(torch.int32), values.bfloat16().float().view(torch.int32))


def test_nan_stays_nan_whatever_its_bits():
    # NVIDIA GPUs make the canonical NaN 0x7FFFFFFF in float32 arithmetic: with its low bits set,
    # adding the rounding bias carries out of the mantissa (into -0.0, or +0.0 from 0xFFFFFFFF)
    nans = from_bits(0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00000, 0x7F800001, 0x7FBFFFFF).to(DEVICE)
    assert nans.isnan().all()
    assert rounded(nans).isnan().all()


@triton.jit
def _round_to_fp16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(out_ptr + offsets, round_to_fp16(tl.load(x_ptr + offsets, mask=inside, other=0.0)), mask=inside)


def test_round_to_fp16_is_the_cast_around_every_boundary():
    """round_to_fp16 == x.to(float16) on every float32 bit pattern within 2**12 of fp16's
    boundaries (both signs): 65504 and 65520 (overflow, the tie to infinity), 2**-14 (normal /
    subnormal), 2**-24 and 2**-25 (the smallest subnormal, the tie to zero), a subnormal tie, 1.0,
    float32's largest, infinity and zero; and on every 4093rd pattern of all 2**32 (NaNs stay NaN)."""
    centres = [0x477FE000, 0x477FF000, 0x38800000, 0x38000000, 0x33800000, 0x33000000, 0x35400000, 0x3F800000,
               0x7F7FFFFF, 0x7F800000, 0x00000000]
    near = torch.cat([torch.arange(c - 2**12, c + 2**12) for c in centres]) % 2**31
    bits = torch.cat([near, near + 2**31, torch.arange(0, 2**32, 4093)])
    values = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32).to(DEVICE)
    out = torch.empty_like(values)
    block = 4096  # 2**16 (512 values a thread) did not finish within 3 minutes on the H200
    _round_to_fp16_kernel[(triton.cdiv(values.numel(), block),)](values, out, values.numel(), BLOCK=block)
    expected = values.half().float()
    nan = values.isnan()
    assert out[nan].isnan().all()
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    assert (expected.abs() < 2**-14).logical_and(expected != 0).sum() > 1000  # subnormals were checked
