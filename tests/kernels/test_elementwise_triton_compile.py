"""The elementwise kernels of long forwards (``rotary_triton``, ``swiglu_triton``, ``rms_norm_triton``'s
tail and squares) compile for sm_90.

Under the interpreter a ``@triton.jit`` function is plain Python: an ``import`` inside it, or a
construct only the compiler refuses, passes the CPU tests and fails on the H200 (it did, for the
SiLU-and-product kernel). Here Triton's own compiler builds them for ``GPUTarget("cuda", 90, 32)``
with the constexprs their wrappers pass, in a subprocess without ``TRITON_INTERPRET``
(``sm90_compile``). Skipped where Triton has no CUDA backend.
"""

from __future__ import annotations

from tests.kernels.sm90_compile import run_compile_script

COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sparse_lens.kernels.rms_norm_triton as rms_norm_triton
import sparse_lens.kernels.rotary_triton as rotary_triton
import sparse_lens.kernels.swiglu_triton as swiglu_triton


def compile_kernel(kernel, constants, pointer_type, pointer_types=None):
    """pointer_types: {name: type} for pointers not of pointer_type."""
    pointer_types = pointer_types or {}
    signature = {name: "constexpr" if name in constants else pointer_types.get(name, pointer_type)
                 if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).metadata.name


print(compile_kernel(rotary_triton._rotary_kernel,
                     dict(HALF=64, HALF_PAD=64, HAS_PASS=False, PASS_PAD=1, BLOCK_T=rotary_triton.BLOCK_T), "*bf16"))
print(compile_kernel(rotary_triton._rotary_kernel,
                     dict(HALF=16, HALF_PAD=16, HAS_PASS=True, PASS_PAD=32, BLOCK_T=rotary_triton.BLOCK_T), "*bf16"))
print(compile_kernel(swiglu_triton._silu_mul_kernel, dict(BLOCK=swiglu_triton.BLOCK, LIBDEVICE_EXP=True), "*bf16"))
for dtype, block_d in (("bf16", rms_norm_triton.MAX_BLOCK_D), ("fp16", 256)):  # d_model >= 1024; d = 129
    print(compile_kernel(rms_norm_triton._rms_norm_kernel,
                         dict(BLOCK_R=rms_norm_triton.BLOCK_ELEMENTS // block_d, BLOCK_D=block_d,
                              IS_BF16=dtype == "bf16"), f"*{dtype}", {"inverse_rms_ptr": "*fp32"}))
for dtype in ("bf16", "fp16"):
    print(compile_kernel(rms_norm_triton._squares_kernel, dict(BLOCK=rms_norm_triton.SQUARES_BLOCK), f"*{dtype}",
                         {"out_ptr": "*fp32"}))
'''


def test_elementwise_kernels_compile_for_sm90():
    names = run_compile_script(COMPILE_SCRIPT).split()
    assert names == ["_rotary_kernel", "_rotary_kernel", "_silu_mul_kernel", "_rms_norm_kernel", "_rms_norm_kernel",
                     "_squares_kernel", "_squares_kernel"]
