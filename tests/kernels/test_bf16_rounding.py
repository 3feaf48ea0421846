"""The bf16 rounding helper of the RoPE and SiLU-and-product kernels (bf16_rounding.round_to_bf16)
against torch's float32 -> bf16 cast (round to nearest, ties to even), special values included."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_lens.kernels.bf16_rounding import round_to_bf16

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
