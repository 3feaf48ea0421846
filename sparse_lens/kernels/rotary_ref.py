"""Rotary position embedding (RoPE), torch reference: the test oracle of ``rotary_triton``.

HF's rotate-half formula (``transformers``' ``apply_rotary_pos_emb``) on one tensor of heads, over
its first ``rotary_dim = cos.shape[-1]`` dims, the rest passed through (partial rotary)::

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

with every product and the sum rounded to ``x``'s dtype, as HF's eager formula rounds them.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def rotary(
    x: Float[Tensor, "batch head pos d_head"],
    cos: Float[Tensor, "batch pos rotary_dim"],
    sin: Float[Tensor, "batch pos rotary_dim"],
) -> Float[Tensor, "batch head pos d_head"]:
    """``x`` rotated by ``cos`` / ``sin`` (broadcast over heads; ``rotary_dim`` even, <= ``d_head``)."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    out = rotated * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]
    return torch.cat([out, passed], dim=-1)
