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
(``rounding.round_to_bf16`` and ``rounding.round_to_fp16``), which behaves alike on the GPU and
under the interpreter and which no compiler pass can drop (a cast to fp16 and back was no rounding
on the H200, see ``rotary_triton``). The result equals the reference bit for bit.

The inverse RMS itself: HF's ``x.to(float32).pow(2)`` is two passes (an upcast copy, then the
square, 14 bytes moved per bf16 element) before the ``mean``. :func:`squares_triton` writes the
same float32 squares in one pass from the 16-bit input (6 bytes per element), and
:func:`inverse_rms_triton` runs ``rsqrt(squares.mean(-1, keepdim=True) + eps)`` on them with
``rms_norm_ref.inverse_rms``'s pieces: the ``mean`` is torch's on the same float32 values in the same
shape and layout as HF's, so the result is HF's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.rms_norm_ref import (
    VARIANCE_PIECE_ELEMENTS,
    VARIANCE_PIECE_MIN_POSITIONS,
    inverse_rms_of_squares,
)
from sparse_lens.kernels.rounding import round_to_bf16, round_to_fp16

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_ELEMENTS = 4096  # elements per program: BLOCK_R rows x BLOCK_D columns
MAX_BLOCK_D = 1024  # columns per program at most (wider rows take several programs)
SQUARES_BLOCK = 4096  # squares_triton: elements per program
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (squares_triton: one index per outer slice)


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


@triton.jit
def _squares_kernel(x_ptr, out_ptr, inner, outer_stride, BLOCK: tl.constexpr):
    # x viewed as [outer, inner]: each outer slice contiguous, slices outer_stride elements apart;
    # the output contiguous [outer, inner]
    outer = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < inner
    h = tl.load(x_ptr + outer * outer_stride + offsets, mask=inside, other=0.0).to(tl.float32)  # exact
    tl.store(out_ptr + outer * inner + offsets, h * h, mask=inside)  # pow(h, 2) as PyTorch computes it


@launch_on_tensor_device
def squares_triton(x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """``rms_norm_ref.squares``: ``x.to(float32).pow(2)`` (same signature and result, bit for bit),
    in one pass, into a new float32 tensor of ``x``'s shape and of the layout torch gives it.

    PyTorch computes ``pow(h, 2)`` as ``h * h`` (one float32 rounding; the upcast is exact), and so
    does this kernel: the tests check the bits against torch's under the interpreter on the CPU, and
    the GPU run of the same tests checks them against CUDA's ``pow``. Layout: torch's squares have
    the strides of ``torch.empty_like(x)`` (``x``'s own when ``x`` is dense, e.g. contiguous;
    contiguous for a slice of positions of a contiguous ``[batch, pos, d]``, as
    ``rms_norm_ref.inverse_rms_of_squares``' pieces are), and so do these, so that a reduction over
    them runs as over torch's. ``x`` is read in place in those two cases, else (e.g. a slice of a
    transposed tensor) copied to that layout first. ``x``: bf16 or fp16, any shape. Raises
    ``ShapeError`` for another dtype."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"squares_triton needs a bf16 / fp16 x; got {tuple(x.shape)} {x.dtype}.")
    out = torch.empty_like(x, dtype=torch.float32)  # the layout of torch's x.to(float32) and its square
    n = x.numel()
    if n == 0:
        return out
    slices = None
    if out.is_contiguous() and out.stride() != x.stride():
        slices = _outer_slices(x)  # x: e.g. a slice of positions; out: contiguous
    if slices is not None:
        source, target = slices, out.view(slices.shape)
    else:
        if out.stride() != x.stride():  # x not dense: a copy in out's layout (empty_like's, as out)
            x = torch.empty_like(x).copy_(x)
        # x dense, out in its layout: both are n consecutive elements in memory, in the same order
        source, target = x.as_strided((1, n), (n, 1)), out.as_strided((1, n), (n, 1))
    outer, inner = source.shape
    grid = (triton.cdiv(inner, SQUARES_BLOCK), outer)
    _squares_kernel[grid](source, target, inner, source.stride(0), BLOCK=SQUARES_BLOCK)
    return out


def _outer_slices(x: Tensor) -> Tensor | None:
    """``x`` as a view ``[outer, pos * d]`` whose rows are contiguous, at most ``MAX_GRID_Y`` of
    them; ``None`` when that needs a copy."""
    if x.dim() < 2:
        return None
    try:  # merges the last two dims and the leading ones, or fails when a copy would be needed
        merged = x.view(-1, x.shape[-2] * x.shape[-1])
    except RuntimeError:
        return None
    if (merged.shape[1] > 1 and merged.stride(1) != 1) or merged.shape[0] > MAX_GRID_Y:
        return None
    return merged


def inverse_rms_triton(
    x: Float[Tensor, "*batch pos d"],
    eps: float,
    piece_elements: int = VARIANCE_PIECE_ELEMENTS,
    min_positions: int = VARIANCE_PIECE_MIN_POSITIONS,
) -> Float[Tensor, "*batch pos 1"]:
    """``rms_norm_ref.inverse_rms`` (same signature and result, bit for bit), each piece's squares
    by :func:`squares_triton` instead of an upcast copy and ``pow``; the ``mean``, ``+ eps`` and
    ``rsqrt`` are torch's, on the same float32 values in the same shape (contiguous, as torch's
    squares are for a contiguous ``x`` and its pieces). ``x``: bf16 or fp16 ``[..., pos, d]``;
    float32 memory: one temporary per piece (the reference: two). Raises ``ShapeError`` for
    another dtype."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(f"inverse_rms_triton needs a bf16 / fp16 x; got {tuple(x.shape)} {x.dtype}.")
    return inverse_rms_of_squares(x, eps, squares_triton, piece_elements, min_positions)
