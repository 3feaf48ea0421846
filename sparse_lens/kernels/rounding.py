"""bf16 and fp16 rounding inside Triton kernels (``@triton.jit`` helpers, no launch here).

Kernels that must reproduce an eager PyTorch formula in a 16-bit dtype bit for bit
(``rotary_triton``, ``swiglu_triton``, ``rms_norm_triton``) compute in float32 and round each
intermediate to the dtype where eager PyTorch rounds it. A cast to the dtype and back would do, but
the Triton interpreter's bf16 cast truncates and a cast to fp16 and back was no rounding on the
H200 (see ``rotary_triton``), so the rounding is written in integer arithmetic on the float32 bits
(round to nearest, ties to even), which behaves the same on the GPU and under the interpreter, and
which no compiler pass can drop.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(value):
    """float32 ``value`` rounded to the nearest bf16 (ties to even), kept as float32; infinities,
    and overflow to infinity, as a cast would. A NaN is returned as it is: with low mantissa bits
    set (NVIDIA's canonical NaN is 0x7FFFFFFF) the rounding bias would carry out of the mantissa
    and make it -0.0, +0.0 or infinity."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(value != value, value, bits.to(tl.float32, bitcast=True))


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
