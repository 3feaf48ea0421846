"""The fused SiLU-and-product kernel against its torch reference (swiglu_ref)."""

from __future__ import annotations

import pytest
import torch

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.swiglu_ref import silu_mul
from sparse_lens.kernels.swiglu_triton import silu_mul_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1


def one_ulp_apart(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elements whose bf16 bit patterns differ by exactly one (adjacent values, same sign)."""
    return (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs() == 1


@pytest.mark.parametrize("shape", [(3, 37, 40), (5000,)])  # a partial last program; several programs
def test_kernel_equals_reference(shape):
    generator = torch.Generator().manual_seed(0)
    gate = (torch.randn(shape, generator=generator) * 4).bfloat16().to(DEVICE)
    up = torch.randn(shape, generator=generator).bfloat16().to(DEVICE)
    got, expected = silu_mul_triton(gate, up), silu_mul(gate, up)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    differs = got != expected
    # bit for bit on the GPU (libdevice exp); under the interpreter numpy's exp may move a rare
    # element by one unit in the last place, never more
    assert not differs.any() if DEVICE == "cuda" else differs.float().mean() < 1e-3
    assert one_ulp_apart(got[differs], expected[differs]).all()
    # the intermediate is rounded as eager PyTorch rounds it: without that many elements differ
    unrounded = (torch.nn.functional.silu(gate.float()) * up.float()).bfloat16()
    assert (unrounded != expected).float().mean() > 0.01


def test_bad_inputs_raise():
    gate = torch.randn(4, 8).bfloat16().to(DEVICE)
    for bad_gate, bad_up in ((gate.float(), gate.float()), (gate, gate[:, :4]), (gate.t(), gate.t())):
        with pytest.raises(ShapeError):
            silu_mul_triton(bad_gate, bad_up)
