"""The block-sparse attention kernels compile for Hopper (sm_90), also where no GPU is present.

The CPU test runs use the Triton interpreter, which accepts code the compiler refuses (a plain
Python float global read inside a kernel, for one). Here Triton's own compiler turns the kernels
into a cubin for sm_90, with the constexprs ``_launch_config`` gives a bf16 launch, for the default
launch and the variants ``benchmarks/attention_sweep.py`` times. It runs in a subprocess without
``TRITON_INTERPRET`` (under it ``@triton.jit`` makes interpreter functions, which do not compile).
Skipped where Triton has no CUDA backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COMPILE_HELPERS = r'''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sparse_lens.kernels.sparse_attention_triton as attention

POINTER_TYPES = {"block_indices_ptr": "*i32", "entry_slots_ptr": "*i32", "item_owners_ptr": "*i32",
                 "item_starts_ptr": "*i32", "item_ends_ptr": "*i32", "grad_key_ptr": "*fp32",
                 "grad_value_ptr": "*fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "block_mass_ptr": "*fp32",
                 "block_gate_ptr": "*fp32", "grad_gate_ptr": "*fp32", "sinks_ptr": "*fp32", "grad_sinks_ptr": "*fp32"}


def compile_kernel(kernel, constexprs, launch, tensor_type="*bf16"):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, tensor_type)
        else:
            signature[name] = "fp32" if name in ("scale", "softcap") else "i32"
    source = ASTSource(kernel, signature, {name: constexprs[name] for name in signature if name in constexprs})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch.kernel_options())
    if tensor_type == "*bf16":
        assert "wgmma" in compiled.asm["ptx"], "no Hopper tensor-core instruction"
    return compiled
'''

COMPILE_SCRIPT = COMPILE_HELPERS + r'''

query = torch.empty(1, 4, 4096, 128, dtype=torch.bfloat16)
value = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
block_indices = torch.empty(1, 4, 64, 16, dtype=torch.int32)
Launch = attention.KernelLaunch
cases = [
    (Launch(), {}),
    (Launch(skip_unreached=False, mask_all=False, heads_inner=True, num_warps=8), {}),
    (Launch(skip_unreached=False, mask_all=False, num_warps=8, kv_chunk=32, l2_hints=True),
     dict(window=100, softcap=30.0, sinks=torch.empty(4), block_gate=torch.empty(1, 4, 64, 16))),
]
for launch, features in cases:
    gate = features.pop("block_gate", None)
    config = attention._launch_config(query, value, block_indices, gate, 64, 64, scale=0.1, launch=launch,
                                      **features) | dict(DOT_UPCAST=False)
    compile_kernel(attention._forward_kernel, config, launch)
    compile_kernel(attention._backward_kernel, config | dict(KV_GRADS=launch.kv_chunk == 0), launch)
    if launch.kv_chunk:
        compile_kernel(attention._key_value_grad_kernel, config, launch)
print("compiled")
'''


# Gemma 3's d_head 256 in float32 (fidelity runs, ``sparse-lens trace``): the launches the kernels
# choose (``launch_for_sizes``) must fit the H200's shared memory. The default launches asked for
# 344,320 B (forward, top_k 16) and 425,984 B (backward, top_k 4) with Triton 3.9.
WIDE_HEAD_SCRIPT = COMPILE_HELPERS + r'''
from sparse_lens.kernels.sparse_attention_launch import SHARED_MEMORY_BUDGET, launch_for_sizes

assert SHARED_MEMORY_BUDGET == 232448
query = torch.empty(1, 4, 4096, 256)
value = torch.empty(1, 1, 4096, 256)
for backward, top_k in ((False, 16), (True, 4)):
    block_indices = torch.empty(1, 4, 64, top_k, dtype=torch.int32)
    default = attention.BACKWARD_LAUNCH if backward else attention.FORWARD_LAUNCH
    launch = launch_for_sizes(default, query, value, block_indices, 64, 64, backward=backward)
    config = attention._launch_config(query, value, block_indices, None, 64, 64, scale=0.1, launch=launch)
    kernel, extra = (attention._backward_kernel, dict(KV_GRADS=True)) if backward else (attention._forward_kernel, {})
    shared = compile_kernel(kernel, config | extra | dict(DOT_UPCAST=False), launch, "*fp32").metadata.shared
    print("backward" if backward else "forward", launch, shared)
    assert shared <= SHARED_MEMORY_BUDGET, (backward, launch, shared)
print("compiled")
'''


def compile_in_subprocess(script: str) -> None:
    pytest.importorskip("triton.backends.nvidia")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_kernels_compile_for_hopper():
    compile_in_subprocess(COMPILE_SCRIPT)


def test_float32_d_head_256_launches_fit_hopper_shared_memory():
    compile_in_subprocess(WIDE_HEAD_SCRIPT)
