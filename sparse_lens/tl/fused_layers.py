"""Fused replacements for position-wise HF layers in chunked long forwards (``tl.chunking``).

At 1M tokens a 1.5B-shaped forward spends seconds in elementwise passes over ``[T, d]`` tensors
that eager HF layers make one operation at a time. Two layer forms common to Llama-type models run
in fewer passes when ``tl.chunking`` runs a layer over chunks (forwards without gradients, no
hook inside the layer):

- :func:`fused_rms_norm`: the RMSNorm with its elementwise tail fused (``kernels.rms_norm_triton``:
  CUDA, bf16 / fp16, bit for bit HF's), else as ``weight * torch.rms_norm(x)``;
- :func:`fused_gated_mlp`: the gated SiLU MLP with ``kernels.swiglu_triton`` between its
  projections (CUDA, bf16).

Each is found by its form, not by architecture: the attributes it needs, then the replacement run
beside the module on the input's first ``PROBE_POSITIONS`` positions must agree with it (every
element to one rounding of the dtype, at most a fraction ``RARE`` of them not equal; for the MLP
the product before the down projection, then the output; on the norm's kernel path, which is
exact, every element must be equal). Anything else keeps the module's own forward (``None``); so does
a gated MLP while gradients are on (the SiLU-and-product kernel has no backward), and a norm runs on
torch then. Measured on the H200 (``benchmarks/model.py --profile``, the
1.5B shape at 1M tokens; docs/benchmarks.md, seventh session): the forward's elementwise kernels
took 3.24 s before these and the RoPE kernel, 1.33 s after (the fused norms 0.12 s, their weight
multiply 0.26 s; the MLP's SiLU and product 0.66 s before, 0.48 s fused); the forward 11.29 s
before, 9.95 s after. Those norm figures are of ``torch.rms_norm`` on CUDA, which moved rare
elements by one unit in the last place, enough to change most of a 4-layer model's residual and
kept blocks (``benchmarks/fused_layers_check.py``). The exact kernel path that replaced it (HF's
``mean`` over fp32 squares written by one Triton pass, then one pass for the rest) costs the same:
0.39 s (squares 0.14, ``mean`` 0.12, the tail 0.13), the forward 9.47 s, and the fused model's
logits, residual and kept blocks equal HF's bit for bit (docs/benchmarks.md, eighth session).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from sparse_lens.kernels.rms_norm_triton import SUPPORTED_DTYPES as RMS_NORM_DTYPES
from sparse_lens.kernels.rms_norm_triton import inverse_rms_triton, rms_norm_triton
from sparse_lens.kernels.swiglu_triton import SUPPORTED_DTYPES as SWIGLU_DTYPES
from sparse_lens.kernels.swiglu_triton import silu_mul_triton

PROBE_POSITIONS = 64  # positions of the input on which a fused layer is checked against the module
RARE = 1e-3  # the most elements of a probe that may differ (each by one unit in the last place)


def fused_rms_norm(module: Any, probe: Tensor) -> Callable[[Tensor], Tensor] | None:
    """HF's Llama-form RMSNorm in fewer passes, or ``None`` unless it reproduces ``module`` on ``probe``.

    ``probe``: ``[..., pos, d_model]``, some of the real input (``tl.chunking`` passes its first
    ``PROBE_POSITIONS`` positions); the returned function maps ``[..., pos, d_model]`` to the
    module's output shape and dtype, position by position.

    HF's RMSNorms of the Llama form (Llama, Qwen2, Mistral, ...) upcast to float32, square, average,
    take ``rsqrt``, multiply, cast back and multiply by ``weight``: about six passes over the
    sequence, 1 s of a 1.5B-shaped forward at 1M tokens on the H200. Two paths:

    - CUDA, bf16 / fp16 input with a ``weight`` of its dtype (none needing a gradient while
      gradients are on: the kernel has no backward): the per-row inverse RMS as HF computes it
      (``rms_norm_triton.inverse_rms_triton``: the float32 squares in one Triton pass, then torch's
      mean and ``rsqrt`` on them, in pieces of bounded float32 memory), then ``rms_norm_triton``
      for the rest (one read of ``x``, one write, PyTorch's roundings): bit for bit HF's output,
      no element differs; a call with gradients on whose input or weight needs one runs the module
      itself;
    - otherwise (the CPU, float32, a weight of another dtype) ``weight * torch.rms_norm(x, eps)``:
      the normalisation in one pass, the weight applied as HF does. On the CPU this is bit for bit
      HF's (kept as is: fewer passes than the reference); on CUDA ``torch.rms_norm`` sums the
      variance in another order, which moved rare elements by one unit in the last place (5e-6 of
      them at 1M tokens on the H200, docs/benchmarks.md) and changed near-ties downstream.

    Used when the module has a 1-D ``weight`` and a float ``variance_epsilon`` (or ``eps``) and the
    two agree on ``probe`` (some of the real input): on the kernel path every element equal (a NaN
    in the module's output refuses it too), on the torch path every element within one rounding of
    the output dtype and at most a fraction ``RARE`` of them not equal. A norm of another form keeps
    its own forward: Gemma's ``1 + weight`` differs far more; OLMo-2's and GPT-OSS' (the weight
    applied in float32, one rounding after it) are within one rounding but differ in about a
    quarter of the bf16 elements. The probe sees only the input's first positions: a norm whose
    forward differs only on inputs unlike them (e.g. a clamp of large values) is not told apart.
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, Tensor) or weight.dim() != 1 or not isinstance(eps, float) or probe.numel() == 0:
        return None

    def on_kernel(piece: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (piece.requires_grad or weight.requires_grad):
            return module(piece)  # the kernel has no backward: HF's norm and its autograd, whatever the probe saw
        piece = piece.contiguous()
        return rms_norm_triton(piece, inverse_rms_triton(piece, eps), weight)

    def on_torch(piece: Tensor) -> Tensor:
        return weight * torch.rms_norm(piece, (piece.shape[-1],), None, eps)

    # the kernel has no backward: a weight needing a gradient keeps the torch path
    exact = _rms_norm_on_kernel(probe, weight) and not _needs_gradients(module)
    forward = on_kernel if exact else on_torch
    with torch.no_grad():
        expected, got = module(probe), forward(probe)
    if exact:  # the kernel path is HF's norm bit for bit: a module it does not reproduce exactly is another form
        return forward if got.dtype == expected.dtype and torch.equal(got, expected) else None
    return forward if _agrees(got, expected) else None


def fused_gated_mlp(module: Any, probe: Tensor) -> Callable[[Tensor], Tensor] | None:
    """``down_proj(silu_mul_triton(gate_proj(x), up_proj(x)))``, or ``None`` unless ``module`` is a
    gated SiLU MLP (Llama, Qwen2, Mistral: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) on a
    CUDA bf16 ``probe``, without gradients to compute. ``probe``: ``[..., pos, d_model]``, some of
    the real input (``tl.chunking``: its first ``PROBE_POSITIONS`` positions, at most one chunk, since
    running the module on it must not chunk again); the returned function maps ``[..., pos, d_model]``
    to ``[..., pos, d_model]`` in bf16.

    Checks: the three projections and ``act_fn`` exist (``down_proj`` a module); no parameter of
    ``module`` needs a gradient while gradients are on (the kernel has no backward: the gate and up
    projections' gradients would be lost; a later call with gradients on whose input or parameters need
    one runs the module itself); ``act_fn`` computes SiLU exactly on a range of bf16
    values; on ``probe``, the module's output is ``down_proj`` of its input to ``down_proj``, and
    that input is the kernel's product, each to within one rounding with at most a fraction
    ``RARE`` of the elements differing (as :func:`fused_rms_norm`). A module of another form is
    refused, e.g. a GELU, a product or an output scaled by even 1%, or one rounding the product
    otherwise. The probe sees only the input's first positions: a form that differs only on other
    inputs (e.g. a clamp of large values) is not told apart. The kernel reads ``gate`` and ``up``
    once instead of eager PyTorch's two kernels over ``[chunk, d_mlp]``, with the same roundings
    (``swiglu_triton``: bit for bit on CUDA)."""
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    parts = [getattr(module, name, None) for name in names]
    if (not all(callable(part) for part in parts) or not isinstance(parts[2], torch.nn.Module)
            or _needs_gradients(module) or not _swiglu_on_kernel(probe)):
        return None
    gate_proj, up_proj, down_proj, act_fn = parts
    values = torch.linspace(-12.0, 12.0, 4096, device=probe.device).to(probe.dtype)
    with torch.no_grad():
        if not torch.equal(act_fn(values), torch.nn.functional.silu(values)):
            return None

    def forward(piece: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (piece.requires_grad or _needs_gradients(module)):
            return module(piece)  # the kernel has no backward: HF's MLP and its autograd, whatever the probe saw
        return down_proj(silu_mul_triton(gate_proj(piece), up_proj(piece)))

    seen: list[Tensor] = []  # the module's input to down_proj (the last call)
    handle = down_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0] if args else None))
    try:
        with torch.no_grad():
            expected = module(probe)
    finally:
        handle.remove()
    if not isinstance(expected, Tensor) or not seen or not isinstance(seen[-1], Tensor):
        return None  # e.g. a mixture of experts returning (hidden states, router scores)
    with torch.no_grad():
        product = silu_mul_triton(gate_proj(probe), up_proj(probe))
        agrees = _agrees(product, seen[-1]) and _agrees(down_proj(seen[-1]), expected)
    return forward if agrees else None


def _needs_gradients(module: Any) -> bool:
    """Gradients are on and some parameter of ``module`` (any, when it is not a torch module) needs one."""
    if not torch.is_grad_enabled():
        return False
    return not isinstance(module, torch.nn.Module) or any(p.requires_grad for p in module.parameters())


def _agrees(got: Tensor, expected: Tensor) -> bool:
    """Same shape and dtype, every element within one rounding of the dtype, at most a fraction
    ``RARE`` of them not equal."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    finfo = torch.finfo(expected.dtype)
    return torch.allclose(got, expected, rtol=finfo.eps, atol=finfo.tiny) and _rarely_differ(got, expected)


def _rarely_differ(got: Tensor, expected: Tensor) -> bool:
    """Whether at most a fraction ``RARE`` of the elements differ (NaN counts as different)."""
    return (got != expected).float().mean().item() <= RARE


def _rms_norm_on_kernel(probe: Tensor, weight: Tensor) -> bool:
    """Whether ``kernels.rms_norm_triton`` takes this input and weight (CUDA, bf16 / fp16, one dtype)."""
    return probe.is_cuda and probe.dtype in RMS_NORM_DTYPES and weight.dtype == probe.dtype and weight.is_cuda


def _swiglu_on_kernel(probe: Tensor) -> bool:
    """Whether ``kernels.swiglu_triton`` takes this input's dtype and device (CUDA bf16)."""
    return probe.is_cuda and probe.dtype in SWIGLU_DTYPES
