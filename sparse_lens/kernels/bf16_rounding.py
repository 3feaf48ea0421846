"""bf16 rounding inside Triton kernels (``@triton.jit`` helper, no launch here).

Kernels that must reproduce an eager PyTorch formula in bf16 bit for bit (``rotary_triton``,
``swiglu_triton``) compute in float32 and round each intermediate to bf16 where eager PyTorch
rounds it. A cast to bf16 and back would do, but the Triton interpreter's cast truncates, so the
rounding is written in integer arithmetic on the float32 bits (round to nearest, ties to even),
which behaves the same on the GPU and under the interpreter, and which no compiler pass can drop.
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
