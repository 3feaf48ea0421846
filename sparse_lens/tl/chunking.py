"""Sequence chunking for position-wise modules, so that million-token forwards fit in memory.

An MLP acts on each position independently, so running it on slices of the sequence gives the
same result while its intermediates ([T, d_mlp], 18 GB in bf16 at 1M tokens for d_mlp = 8960)
shrink to [chunk, d_mlp]. The chunking is installed on the wrapped HF module, inside the
bridge's ``mlp.hook_in`` / ``mlp.hook_out``, so hooks still see whole-sequence tensors.

With gradients on, each chunk runs under activation checkpointing (``checkpoint_blocks``' helper):
the backward keeps only the chunk inputs and recomputes one chunk's intermediates at a time, so
the bound holds in the backward too.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from sparse_lens.tl.checkpointing import RecomputeState, checkpointed_call


def set_mlp_chunking(blocks: Any, chunk_tokens: int | None, state: RecomputeState | None = None) -> None:
    """Run every block's MLP on at most ``chunk_tokens`` positions at a time (``None``: whole sequence).
    ``state``: the model's recompute state (flags the chunks' recomputation in the backward)."""
    state = RecomputeState() if state is None else state
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}.")
    for block in blocks:
        mlp = block.mlp.original_component
        mlp.__dict__.pop("forward", None)  # back to the class's forward
        if chunk_tokens is not None:
            mlp.forward = partial(_chunked_forward, mlp.forward, chunk_tokens, state)


def _chunked_forward(
    forward: Callable[[Tensor], Tensor], chunk_tokens: int, state: RecomputeState, hidden_states: Tensor
) -> Tensor:
    if hidden_states.shape[-2] <= chunk_tokens:
        return forward(hidden_states)
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        parts = [checkpointed_call(forward, state, (part,)) for part in hidden_states.split(chunk_tokens, dim=-2)]
    else:
        parts = [forward(part) for part in hidden_states.split(chunk_tokens, dim=-2)]
    return torch.cat(parts, dim=-2)
