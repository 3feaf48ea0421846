"""SwiGLU's elementwise half, Triton kernel: ``swiglu_ref.silu_mul`` in one pass.

At 1M tokens the 1.5B-shaped model's MLP intermediates are ``[T, 8960]`` (18.8 GB in bf16 per
tensor, in 65,536-token chunks): eager SiLU reads ``gate`` and writes its activation, the product
reads that and ``up`` and writes the result, 0.66 s of a 10.2 s forward on the H200. This kernel
reads ``gate`` and ``up`` once and writes the product once.

One program per ``BLOCK`` elements of the flattened (contiguous) tensors. bf16 only, rounded as eager
PyTorch rounds it: SiLU in float32 as PyTorch's CUDA kernel writes it, ``x / (1 + exp(-x))``
(``exp`` as CUDA's ``expf``, libdevice, and an IEEE division), rounded to bf16, then the product
rounded (``rounding.round_to_bf16``). On the GPU the result equals the reference bit for bit;
under the Triton interpreter (no libdevice there) ``exp`` is numpy's, so a rare element may differ
by one unit in the last place (the tests allow that, and only that).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor
from triton.language.extra import libdevice

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.device_guard import launch_on_tensor_device
from sparse_lens.kernels.rounding import round_to_bf16

SUPPORTED_DTYPES = (torch.bfloat16,)
BLOCK = 2048  # elements per program


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n_elements
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if LIBDEVICE_EXP:
        decay = libdevice.exp(-gate)
    else:
        decay = tl.exp(-gate)
    silu = round_to_bf16(tl.math.div_rn(gate, 1.0 + decay))
    tl.store(out_ptr + offsets, round_to_bf16(silu * up).to(tl.bfloat16), mask=inside)


@launch_on_tensor_device
def silu_mul_triton(
    gate: Float[Tensor, "*batch d_mlp"], up: Float[Tensor, "*batch d_mlp"]
) -> Float[Tensor, "*batch d_mlp"]:
    """``swiglu_ref.silu_mul`` (same signature and result), into a new tensor: ``gate`` and ``up``
    bf16, contiguous, of one shape and device; ``ShapeError`` otherwise."""
    if (gate.dtype not in SUPPORTED_DTYPES or up.dtype != gate.dtype or gate.shape != up.shape
            or gate.device != up.device or not gate.is_contiguous() or not up.is_contiguous()):
        raise ShapeError(f"silu_mul_triton needs contiguous bf16 gate and up of one shape and device, got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}.")
    out = torch.empty_like(gate)
    if out.numel():
        _silu_mul_kernel[(triton.cdiv(out.numel(), BLOCK),)](
            gate, up, out, out.numel(), BLOCK=BLOCK, LIBDEVICE_EXP=os.environ.get("TRITON_INTERPRET") != "1")
    return out
