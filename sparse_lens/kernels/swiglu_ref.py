"""SwiGLU's elementwise half, torch reference: the test oracle of ``swiglu_triton``.

The gated MLP of Llama-type models (Llama, Qwen2, Mistral, ...) is
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn`` SiLU; between the projections
eager PyTorch runs two kernels, SiLU and the product, each rounding to the dtype.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def silu_mul(gate: Float[Tensor, "*batch d_mlp"], up: Float[Tensor, "*batch d_mlp"]) -> Float[Tensor, "*batch d_mlp"]:
    """``silu(gate) * up``, as eager PyTorch computes and rounds it."""
    return torch.nn.functional.silu(gate) * up
