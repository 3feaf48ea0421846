"""RMSNorm's elementwise tail, Triton kernel: ``rms_norm_ref.rms_norm`` in one pass.

HF's Llama-form RMSNorm runs about six passes over ``[T, d_model]`` (upcast, square, mean,
multiply, cast back, weight). ``torch.rms_norm`` fuses the normalisation, but on CUDA it sums the
variance in another order than HF's ``pow(2).mean(-1)`` and moves rare elements by one unit in the
last place, which changes near-ties of a long forward downstream. Here the per-row inverse RMS is
computed by HF's own torch operations (``rms_norm_ref.inverse_rms``) and only the tail is fused:
this kernel reads ``x`` once, its row's ``inverse_rms`` and ``weight``, and writes the output once.

Grid ``(cdiv(rows, BLOCK_R), cdiv(d, BLOCK_D))`` over ``x`` viewed as ``[rows, d]`` (contiguous):
a program loads ``BLOCK_D`` values of ``weight`` and ``BLOCK_R`` of ``inverse_rms`` once. bf16 and
fp16, rounded as eager PyTorch rounds them: ``x * inverse_rms`` in float32 (one rounding), rounded
to the dtype, times ``weight`` in float32 (exact: two 16-bit significands fit in float32's), rounded
to the dtype; every rounding to nearest, ties to even, by integer arithmetic on the float32 bits
(``bf16_rounding.round_to_bf16``, :func:`round_to_fp16` here), which behaves alike on the GPU and
under the interpreter and which no compiler pass can drop (a cast to fp16 and back was no rounding
on the H200, see ``rotary_triton``). The result equals the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.bf16_rounding import round_to_bf16
from sparse_lens.kernels.device_guard import launch_on_tensor_device

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_ELEMENTS = 4096  # elements per program: BLOCK_R rows x BLOCK_D columns
MAX_BLOCK_D = 1024  # columns per program at most (wider rows take several programs)


@triton.jit
def round_to_fp16(value):
    """float32 ``value`` rounded to the nearest fp16 (ties to even), kept as float32, as a cast
    would: fp16's subnormals (multiples of 2**-24 below 2**-14) included, overflow past 65504 to
    infinity, a NaN returned as it is."""
    bits = value.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    magnitude = bits & 0x7FFFFFFF
    # fp16's normal range: 10 of float32's 23 significand bits kept (a carry into the exponent is right)
    normal = (magnitude + 0xFFF + ((magnitude >> 13) & 1)) & 0x7FFFE000
    normal = tl.where(normal > 0x477FE000, 0x7F800000, normal)  # past 65504: infinity
    # below 2**-14: the significand (with its implicit bit) in units of 2**-24, shifted and rounded
    significand = (magnitude & 0x7FFFFF) | 0x800000
    # value = significand * 2**(exponent - 150), so units = significand >> (126 - exponent); the
    # exponent capped at 112 (where this is used it is) and the shift at 31 (below 2**-25: 0)
    shift = tl.minimum(126 - tl.minimum(magnitude >> 23, 112), 31)
    units = significand >> shift
    rest = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    units += ((rest > half) | ((rest == half) & ((units & 1) == 1))).to(tl.uint32)
    subnormal = (units.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)  # * 2**-24, exact
    rounded = (tl.where(magnitude < 0x38800000, subnormal, normal) | sign).to(tl.float32, bitcast=True)
    return tl.where(value != value, value, rounded)


@triton.jit
def _rms_norm_kernel(
    x_ptr, inverse_rms_ptr, weight_ptr, out_ptr, n_rows, d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, IS_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < n_rows) & (columns[None, :] < d)
    at = rows[:, None].to(tl.int64) * d + columns[None, :]
    x = tl.load(x_ptr + at, mask=inside, other=0.0)
    scale = tl.load(inverse_rms_ptr + rows, mask=rows < n_rows, other=0.0)
    weight = tl.load(weight_ptr + columns, mask=columns < d, other=0.0).to(tl.float32)
    normed = x.to(tl.float32) * scale[:, None]  # HF: h * rsqrt(variance + eps), float32
    if IS_BF16:  # .to(x.dtype), then weight * that, in float32 and rounded once
        out = round_to_bf16(round_to_bf16(normed) * weight[None, :])
    else:
        out = round_to_fp16(round_to_fp16(normed) * weight[None, :])
    tl.store(out_ptr + at, out.to(x.dtype), mask=inside)  # exact: out is a value of the dtype


@launch_on_tensor_device
def rms_norm_triton(
    x: Float[Tensor, "*batch d"], inverse_rms: Float[Tensor, "*batch 1"], weight: Float[Tensor, " d"]
) -> Float[Tensor, "*batch d"]:
    """``rms_norm_ref.rms_norm`` (same signature and result, bit for bit), into a new tensor.

    ``x``: bf16 or fp16, contiguous, ``[..., d]``; ``inverse_rms``: float32, ``x.shape[:-1] + (1,)``
    (any layout: it is made contiguous, one value per row); ``weight``: ``[d]``, ``x``'s dtype; all
    on one device. Raises ``ShapeError`` otherwise."""
    if (x.dtype not in SUPPORTED_DTYPES or x.dim() == 0 or not x.is_contiguous() or weight.dtype != x.dtype
            or weight.shape != x.shape[-1:] or inverse_rms.dtype != torch.float32
            or inverse_rms.shape != (*x.shape[:-1], 1) or not x.device == inverse_rms.device == weight.device):
        raise ShapeError(f"rms_norm_triton needs a contiguous bf16 / fp16 x [..., d], a float32 inverse_rms "
                         f"[..., 1] and a weight [d] of x's dtype, on one device; got x {tuple(x.shape)} {x.dtype} "
                         f"{x.device}, inverse_rms {tuple(inverse_rms.shape)} {inverse_rms.dtype} "
                         f"{inverse_rms.device}, weight {tuple(weight.shape)} {weight.dtype} {weight.device}.")
    out = torch.empty_like(x)
    d = x.shape[-1]
    n_rows = x.numel() // d if d else 0
    if out.numel() == 0:
        return out
    block_d = min(triton.next_power_of_2(d), MAX_BLOCK_D)
    block_r = max(1, BLOCK_ELEMENTS // block_d)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(d, block_d))
    _rms_norm_kernel[grid](
        x, inverse_rms.contiguous(), weight.contiguous(), out, n_rows, d,
        BLOCK_R=block_r, BLOCK_D=block_d, IS_BF16=x.dtype == torch.bfloat16,
    )
    return out
