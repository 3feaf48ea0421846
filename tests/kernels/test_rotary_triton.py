"""The RoPE kernel against its torch reference (rotary_ref), and the reference against HF's formula."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.rotary_ref import rotary
from sparse_lens.kernels.rotary_triton import rotary_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1


def inputs(dtype, rotary_dim=16, d_head=16, seq_len=45, batch=2, heads=3, seed=0):
    """x in the bridge's layout ([batch, pos, head, d] transposed: not contiguous), cos / sin of one
    batch row; random halves (not repeated), so that every product of the formula is checked."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, seq_len, heads, d_head, generator=generator) * 2).to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(1, seq_len, rotary_dim, generator=generator).to(dtype) for _ in range(2))
    return x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE)


def test_reference_is_hf_formula():
    x, cos, sin = inputs(torch.bfloat16)
    expected, _ = apply_rotary_pos_emb(x, x[:, :1], cos, sin)
    assert torch.equal(rotary(x, cos, sin), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("rotary_dim,d_head", [(16, 16), (8, 16), (8, 12), (24, 24), (32, 80)])
def test_kernel_equals_reference_bit_for_bit(dtype, rotary_dim, d_head):
    # 45 positions: a partial last program of 32; (8, 12): partial rotary, 4 dims passed through;
    # (24, 24): halves of 12 in 16 lanes (masked); (32, 80): Phi-2's 40%, 48 dims passed in 64 lanes
    x, cos, sin = inputs(dtype, rotary_dim, d_head)
    got = rotary_triton(x, cos, sin)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, rotary(x, cos, sin))
    assert not torch.equal(got, x)


def test_per_batch_cos_sin():
    x, cos, sin = inputs(torch.bfloat16)
    cos, sin = torch.cat([cos, cos.flip(1)]), torch.cat([sin, -sin])
    assert torch.equal(rotary_triton(x, cos, sin), rotary(x, cos, sin))


def test_bad_inputs_raise():
    x, cos, sin = inputs(torch.bfloat16)
    for dtype in (torch.float32, torch.float16):  # they stay on the torch path
        with pytest.raises(ShapeError):
            rotary_triton(x.to(dtype), cos.to(dtype), sin.to(dtype))
    with pytest.raises(ShapeError):
        rotary_triton(x, cos[..., :7], sin[..., :7])  # odd rotary_dim
    with pytest.raises(ShapeError):
        rotary_triton(x, cos[:, :10], sin[:, :10])  # positions differ


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only: 10 GB of inputs and outputs")
def test_head_offsets_past_int32():
    """A contiguous x whose 16th head starts at element 2**31 (17 heads x 2**23 positions x 16 dims):
    with an int32 ``head * stride`` the last head read another head's memory."""
    heads, seq_len, d_head = 17, 2**23, 16
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1, heads, seq_len, d_head, device=DEVICE, generator=generator, dtype=torch.bfloat16)
    cos, sin = (torch.randn(1, seq_len, d_head, device=DEVICE, generator=generator, dtype=torch.bfloat16)
                for _ in range(2))
    assert (heads - 1) * x.stride(1) >= 2**31
    got = rotary_triton(x, cos, sin)[:, heads - 1:]
    assert torch.equal(got, rotary(x[:, heads - 1:], cos, sin))
