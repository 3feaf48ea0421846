"""Rotary position embedding (RoPE), Triton kernel: ``rotary_ref.rotary`` in one pass.

At 1M tokens the rotation of a 1.5B-shaped model's queries and keys (3.7 GB per layer in bf16) took
about 0.8 s of a 10.4 s forward as torch operations on the halves of strided views (eight kernels
per chunk, each reading and writing the sequence); this kernel reads ``x``, ``cos`` and ``sin`` once
and writes the output once.

Grid ``(cdiv(pos, BLOCK_T), batch)``: a program loads ``BLOCK_T`` positions of ``cos`` / ``sin``
once and rotates them for every head of ``x`` (``[batch, head, pos, d_head]``, any strides with a
unit last one), writing a contiguous output. bf16 only: each product and the sum are rounded to
bf16 as HF's eager formula rounds them (``rounding.round_to_bf16``; the product of
two bf16 values and the sum of two are exact or rounded once in float32, so the result equals the
reference bit for bit). Other dtypes stay on the torch path: float32 because the compiler may fuse
a multiply and an add; fp16 because a cast to fp16 and back was not a rounding on the H200 (Triton
3.6: 1-ulp differences from the reference, not seen under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.rounding import round_to_bf16

SUPPORTED_DTYPES = (torch.bfloat16,)
BLOCK_T = 32  # positions per program


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, seq_len, d_head,
    stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    positions = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HALF_PAD)
    rows = positions[:, None] < seq_len
    in_half = rows & (dims[None, :] < HALF)
    trig = batch * stride_cb + positions[:, None].to(tl.int64) * stride_ct + dims[None, :]
    cos_first = tl.load(cos_ptr + trig, mask=in_half, other=0.0).to(tl.float32)
    cos_second = tl.load(cos_ptr + trig + HALF, mask=in_half, other=0.0).to(tl.float32)
    sin_first = tl.load(sin_ptr + trig, mask=in_half, other=0.0).to(tl.float32)
    sin_second = tl.load(sin_ptr + trig + HALF, mask=in_half, other=0.0).to(tl.float32)
    pass_dims = 2 * HALF + tl.arange(0, PASS_PAD)
    in_pass = rows & (pass_dims[None, :] < d_head)
    # x's head advanced by stride_xh per head: an int32 product head * stride_xh would pass 2**31 on
    # long contiguous inputs (the 16th head of [1, 16+, 1M, 128]) and read another head's memory
    x_head = x_ptr + batch * stride_xb
    for head in range(n_heads):
        x_at = x_head + positions[:, None].to(tl.int64) * stride_xt
        out_at = out_ptr + ((batch * n_heads + head) * seq_len + positions[:, None].to(tl.int64)) * d_head
        first = tl.load(x_at + dims[None, :], mask=in_half, other=0.0)
        second = tl.load(x_at + HALF + dims[None, :], mask=in_half, other=0.0)
        x1, x2 = first.to(tl.float32), second.to(tl.float32)
        # each product rounded to the dtype, then the sum (HF: x * cos + rotate_half(x) * sin)
        out_first = round_to_bf16(round_to_bf16(x1 * cos_first) - round_to_bf16(x2 * sin_first))
        out_second = round_to_bf16(round_to_bf16(x2 * cos_second) + round_to_bf16(x1 * sin_second))
        tl.store(out_at + dims[None, :], out_first.to(first.dtype), mask=in_half)
        tl.store(out_at + HALF + dims[None, :], out_second.to(first.dtype), mask=in_half)
        if HAS_PASS:  # partial rotary: the other dims pass through
            tl.store(out_at + pass_dims[None, :], tl.load(x_at + pass_dims[None, :], mask=in_pass), mask=in_pass)
        x_head += stride_xh


@launch_on_tensor_device
def rotary_triton(
    x: Float[Tensor, "batch head pos d_head"],
    cos: Float[Tensor, "batch pos rotary_dim"],
    sin: Float[Tensor, "batch pos rotary_dim"],
) -> Float[Tensor, "batch head pos d_head"]:
    """``rotary_ref.rotary`` (same signature and result, bit for bit), into a new contiguous tensor.

    ``x``: bf16 with a unit last stride; ``cos`` / ``sin``: ``x``'s dtype, ``[1 or batch,
    pos, rotary_dim]`` with ``rotary_dim`` even and <= ``d_head``. Raises ``ShapeError`` otherwise."""
    batch, n_heads, seq_len, d_head = x.shape
    rotary_dim = cos.shape[-1]
    if (x.dtype not in SUPPORTED_DTYPES or cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape != sin.shape
            or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len or rotary_dim % 2
            or rotary_dim > d_head or x.stride(-1) != 1):
        raise ShapeError(f"rotary_triton needs bf16 x [batch, head, pos, d_head] with a unit last stride and cos / "
                         f"sin of its dtype, [1 or batch, pos, even rotary_dim <= d_head]; got x {tuple(x.shape)} "
                         f"{x.dtype}, cos {tuple(cos.shape)} {cos.dtype}, sin {tuple(sin.shape)} {sin.dtype}.")
    cos, sin = cos.expand(batch, -1, -1).contiguous(), sin.expand(batch, -1, -1).contiguous()
    out = torch.empty((batch, n_heads, seq_len, d_head), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = rotary_dim // 2
    grid = (triton.cdiv(seq_len, BLOCK_T), batch)
    _rotary_kernel[grid](
        x, cos, sin, out, n_heads, seq_len, d_head, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
        cos.stride(1), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HAS_PASS=d_head > rotary_dim, PASS_PAD=triton.next_power_of_2(max(d_head - rotary_dim, 1)), BLOCK_T=BLOCK_T,
    )
    return out
