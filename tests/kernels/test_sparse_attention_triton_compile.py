"""The block-sparse attention kernels compile for Hopper (sm_90), also where no GPU is present.

The CPU test runs use the Triton interpreter, which accepts code the compiler refuses (a plain
Python float global read inside a kernel, for one). Here Triton's own compiler turns the kernels
into a cubin for sm_90, with the constexprs ``_launch_config`` gives a bf16 launch, for the default
launch and the variants ``benchmarks/attention_sweep.py`` times. Then the launches the kernels
choose for d_head 64 / 128 / 256 in bf16 / fp16 / float32 (``launch_for_sizes``), compiled as a GPU
compiles them, must fit the H200's shared memory and their ``shared_memory_bytes`` estimate. Each
runs in a subprocess without ``TRITON_INTERPRET`` (under it ``@triton.jit`` makes interpreter
functions, which do not compile). Skipped where Triton has no CUDA backend.
"""

from __future__ import annotations

import pytest

from tests.kernels.sm90_compile import compile_cases, run_compile_script

COMPILE_HELPERS = r'''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sparse_lens.kernels.sparse_attention_triton as attention

POINTER_TYPES = {"block_indices_ptr": "*i32", "entry_slots_ptr": "*i32", "item_owners_ptr": "*i32",
                 "item_starts_ptr": "*i32", "item_ends_ptr": "*i32", "grad_key_ptr": "*fp32",
                 "grad_value_ptr": "*fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "block_mass_ptr": "*fp32",
                 "block_gate_ptr": "*fp32", "grad_gate_ptr": "*fp32", "sinks_ptr": "*fp32", "grad_sinks_ptr": "*fp32",
                 "grad_query_sums_ptr": "*fp32", "grad_gate_sums_ptr": "*fp32"}


def compile_kernel(kernel, constexprs, launch, tensor_type="*bf16", products=True):
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
    if tensor_type == "*bf16" and products:  # (the dq_atomics backward's first kernel has no tile product)
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
    (Launch(skip_unreached=False, mask_all=False, num_warps=8, kv_chunk=32, dq_atomics=True),
     dict(block_gate=torch.empty(1, 4, 64, 16))),
]
for launch, features in cases:
    gate = features.pop("block_gate", None)
    config = attention._launch_config(query, value, block_indices, gate, 64, 64, scale=0.1, launch=launch,
                                      **features) | dict(DOT_UPCAST=False)
    compile_kernel(attention._forward_kernel, config, launch)
    compile_kernel(attention._backward_kernel, config | dict(KV_GRADS=launch.kv_chunk == 0,
                                                             QUERY_GRADS=not launch.dq_atomics), launch,
                   products=not launch.dq_atomics)
    if launch.kv_chunk:
        compile_kernel(attention._key_value_grad_kernel, config | dict(QUERY_GRADS=launch.dq_atomics), launch)
print("compiled")
'''


# The launches the kernels choose (``launch_for_sizes``) must fit the H200's shared memory, as a GPU
# compiles them: ``JITFunction.run`` is replaced by a compile for sm_90 with the JIT's own
# specialisation of the launch's arguments (16-byte aligned pointers and integers divisible by 16
# carry ``tt.divisibility``, under which the pipeliner stages the tile loads in shared memory; the
# plain ``ASTSource`` above has none, and so compiled bf16 d_head 256's backward into 131,080 B
# where the H200 asked 327,680 B and failed: Gemma 3 in bf16, attribution_patching at 32k tokens).
# The real ``launch_forward`` / ``launch_backward`` run on empty CPU tensors of each case's shapes.
LAUNCH_SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from sparse_lens.kernels.sparse_attention_launch import (
    BACKWARD_LAUNCH, FORWARD_LAUNCH, LONG_BACKWARD_FROM, LONG_BACKWARD_LAUNCH, SHARED_MEMORY_BUDGET, backward_launch,
    launch_for_sizes, shared_memory_bytes)
from sparse_lens.kernels.sparse_attention_triton import launch_backward, launch_forward

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = CUDABackend(TARGET)
SHARED = {}


def compile_instead_of_launch(kernel, *args, grid, warmup=False, **kwargs):
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound_args, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    SHARED[kernel.fn.__name__] = triton.compile(source, target=TARGET, options=options.__dict__).metadata.shared


JITFunction.run = compile_instead_of_launch


def measure(case):
    dtype, d, block, top_k = getattr(torch, case["dtype"]), case["d_head"], case["block"], case["top_k"]
    seq, heads, gated = 4 * max(block, 64), 4, case["gated"]
    query, key = torch.empty(1, heads, seq, d, dtype=dtype), torch.empty(1, 1, seq, d, dtype=dtype)
    block_indices = torch.zeros(1, heads, seq // block, top_k, dtype=torch.int32)
    gate = torch.empty(block_indices.shape, dtype=dtype) if gated else None
    lse, output = torch.empty(1, heads, seq), torch.empty_like(query)
    blocks = dict(query_block=block, key_block=block, scale=0.1, window=case["window"])
    SHARED.clear()
    launch_forward(query, key, key, block_indices, gate, output, lse, torch.empty(block_indices.shape),
                   with_mass=case["with_mass"], **blocks)
    launch_backward(query, key, key, block_indices, gate, output, output, lse, torch.empty_like(query),
                    torch.empty(key.shape), torch.empty(key.shape), gate, **blocks)
    rows = {}
    for kernel, default, backward in (("forward_kernel", FORWARD_LAUNCH, False),
                                      ("backward_kernel", BACKWARD_LAUNCH, True)):
        launch = launch_for_sizes(default, query, key, block_indices, block, block, backward=backward)
        estimate = shared_memory_bytes(launch, block, block, d, d, query.element_size(), backward=backward)
        rows[kernel] = dict(shared=SHARED[kernel], estimate=estimate, default=launch == default)
    # The long sequences' backward (FlashAttention-2's order), where it is the default (head dims up to
    # 128): its key/value kernel must fit as well (shared_memory_bytes does not model it: the budget
    # is its bound).
    if backward_launch(LONG_BACKWARD_FROM, d, top_k) != LONG_BACKWARD_LAUNCH:
        return rows
    launch_backward(query, key, key, block_indices, gate, output, output, lse, torch.empty_like(query),
                    torch.empty(key.shape), torch.empty(key.shape), gate, launch=LONG_BACKWARD_LAUNCH, **blocks)
    rows["long_key_value_grad_kernel"] = dict(shared=SHARED["key_value_grad_kernel"], estimate=SHARED_MEMORY_BUDGET,
                                              default=True)
    return rows


for case in json.loads(sys.argv[1]):
    print(json.dumps([case["id"], measure(case)]), flush=True)
"""


def _case(dtype, d_head, block=64, top_k=16, *, gated=False, window=None, with_mass=True, keeps_default=()):
    """``keeps_default``: the kernels whose launch must stay the default (the speed path)."""
    case = dict(dtype=dtype, d_head=d_head, block=block, top_k=top_k, gated=gated, window=window,
                with_mass=with_mass, keeps_default=list(keeps_default))
    case["id"] = (f"{dtype}-d{d_head}-block{block}-top{top_k}" + ("-gated" if gated else "")
                  + (f"-window{window}" if window else "") + ("" if with_mass else "-no-mass"))
    return pytest.param(case, id=case["id"])


BOTH = ("forward_kernel", "backward_kernel")
LAUNCH_CASES = [
    # Gemma 3 270M in bf16 (d_head 256, 64-token blocks): global layers (attribution_patching asked
    # 327,680 B in the backward on the H200), local layers' window band gated (block_attribution).
    _case("bfloat16", 256, keeps_default=("forward_kernel",)),
    _case("bfloat16", 256, top_k=9, gated=True, window=512),
    _case("float16", 256, block=128),
    # A dense band (dense_sdpa: rows of more than WIDE_ROWS slots branch, no block masses).
    _case("bfloat16", 256, top_k=128, with_mass=False),
    # float32 d_head 256 (fidelity runs, ``sparse-lens trace``): 344,320 B forward / 425,984 B backward before.
    _case("float32", 256),
    # The speed path stays as it is: d_head 128 in bf16; float32 d_head 128's backward is within 3 KiB.
    _case("bfloat16", 128, keeps_default=BOTH),
    _case("float32", 128, keeps_default=BOTH),
    _case("bfloat16", 64, block=16, keeps_default=BOTH),
]


@pytest.fixture(scope="module")
def launch_shared_bytes():
    return compile_cases(LAUNCH_SCRIPT, [param.values[0] for param in LAUNCH_CASES])


@pytest.mark.parametrize("case", LAUNCH_CASES)
def test_chosen_launches_fit_hopper_shared_memory_within_their_estimate(case, launch_shared_bytes):
    from sparse_lens.kernels.sparse_attention_launch import SHARED_MEMORY_BUDGET

    assert SHARED_MEMORY_BUDGET == 232_448  # the H200's (and H100's) opt-in limit per block
    for kernel, row in launch_shared_bytes[case["id"]].items():
        assert 0 < row["shared"] <= SHARED_MEMORY_BUDGET, (kernel, row)
        assert row["shared"] <= row["estimate"], (kernel, row)  # shared_memory_bytes is an upper bound
        if kernel in case["keeps_default"]:
            assert row["default"], (kernel, row)


def test_kernels_compile_for_hopper():
    assert "compiled" in run_compile_script(COMPILE_SCRIPT, timeout=600)
