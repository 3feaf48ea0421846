"""Sequence chunking for position-wise modules, so that million-token forwards fit in memory.

An MLP acts on each position independently, so running it on slices of the sequence gives the
same result while its intermediates ([T, d_mlp], 18 GB in bf16 at 1M tokens for d_mlp = 8960)
shrink to [chunk, d_mlp]. The chunking is installed on the wrapped HF module, inside the
bridge's ``mlp.hook_in`` / ``mlp.hook_out``, so hooks still see whole-sequence tensors; an MLP with
a hook inside it (``mlp.hook_pre``, its linear layers' hooks) runs unchunked, so that hook fires once
on every position (and is not rerun by a chunk's recomputation in the backward).

Norms are position-wise too. TransformerLens' norm bridge computes ``hook_scale`` and
``hook_normalized`` in float32 over the whole sequence and then runs the HF norm, which upcasts
to float32 again: four float32 ``[T, d_model]`` tensors alive at once, 8 residual-stream copies
in bf16 (the peak of a whole forward). :func:`set_norm_chunking` runs each block norm and the
final norm over ``chunk_tokens`` positions at a time in forwards without gradients; when neither
``hook_scale`` nor ``hook_normalized`` carries a hook it calls the HF norm alone (what the bridge
returns then), else the bridge's own computation runs unchunked. ``hook_in`` / ``hook_out`` see
whole-sequence tensors. The chunks' outputs are written into one output tensor (no concatenation,
which would hold the output twice). Norms of the Llama RMSNorm form and gated SiLU MLPs (CUDA,
bf16, no parameter needing a gradient) run fused (``sparse_lens.tl.fused_layers``: fewer passes
over the sequence, checked against the module on the input's first positions, at most one chunk).

With gradients on, each MLP chunk runs under activation checkpointing (``checkpoint_blocks``'
helper): the backward keeps only the chunk inputs and recomputes one chunk's intermediates at a
time, so the bound holds in the backward too; norms are chunked then by ``checkpoint_blocks``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.checks import is_int_at_least
from sparse_lens.tl.checkpointing import RecomputeState, checkpointed_call, position_wise_norms
from sparse_lens.tl.fused_layers import PROBE_POSITIONS, fused_gated_mlp, fused_rms_norm


def set_mlp_chunking(blocks: Any, chunk_tokens: int | None, state: RecomputeState | None = None) -> None:
    """Run every block's MLP on at most ``chunk_tokens`` positions at a time (``None``: whole sequence).
    ``state``: the model's recompute state (flags the chunks' recomputation in the backward)."""
    state = RecomputeState() if state is None else state
    _check_chunk_tokens(chunk_tokens)
    for block in blocks:
        mlp = block.mlp.original_component
        mlp.__dict__.pop("forward", None)  # back to the class's forward
        if chunk_tokens is not None:
            inner = _inner_hooks(block.mlp)
            mlp.forward = partial(_chunked_forward, mlp, mlp.forward, chunk_tokens, state, inner, set())


def set_norm_chunking(model: Any, chunk_tokens: int | None) -> None:
    """Run every block norm and the final norm of ``model`` (a TransformerLens bridge) over at most
    ``chunk_tokens`` positions at a time in forwards without gradients (``None``: whole sequence;
    module docstring). Results do not change."""
    _check_chunk_tokens(chunk_tokens)
    for norm in position_wise_norms(model):
        norm.__dict__.pop("forward", None)  # into the instance dict: bridges pass attribute writes to the HF module
        if chunk_tokens is not None:
            norm.__dict__["forward"] = partial(_chunked_norm_forward, norm, chunk_tokens)


def _check_chunk_tokens(chunk_tokens: Any) -> None:
    """``InvalidConfigError`` (a ``ValueError``) unless ``chunk_tokens`` is None or an int >= 1
    (``True`` or ``2.5`` would silently chunk by 1 token or fail mid-forward)."""
    if chunk_tokens is not None and not is_int_at_least(chunk_tokens, 1):
        raise InvalidConfigError(f"chunk_tokens must be an int >= 1 or None, got {chunk_tokens!r}.")


def _inner_hooks(module: Any) -> list[HookPoint]:
    """The hook points inside a bridge other than its own ``hook_in`` / ``hook_out``."""
    outer = (getattr(module, "hook_in", None), getattr(module, "hook_out", None))
    return [hook for hook in module.modules() if isinstance(hook, HookPoint) and all(hook is not o for o in outer)]


def _chunked_forward(
    mlp: Any, forward: Callable[[Tensor], Tensor], chunk_tokens: int, state: RecomputeState,
    inner_hooks: list[HookPoint], unchunked: set, hidden_states: Tensor,
) -> Tensor:
    # A hook inside the MLP (mlp.hook_pre, its linear layers' hooks) must see the whole sequence
    # once (a cache would keep the last chunk), and with gradients must not be rerun by a chunk's
    # recomputation after run_with_hooks removed it: such an MLP runs unchunked. So does one that
    # returns more than a tensor (gpt-oss' MoE: (hidden states, router scores of the flattened
    # tokens), not a position-wise output): found on its first chunk, remembered in ``unchunked``.
    if hidden_states.shape[-2] <= chunk_tokens or unchunked or any(hook.has_hooks() for hook in inner_hooks):
        return forward(hidden_states)
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        parts = []
        for part in hidden_states.split(chunk_tokens, dim=-2):
            parts.append(checkpointed_call(forward, state, (part,)))
            if not isinstance(parts[-1], Tensor):
                unchunked.add("not a tensor")
                return forward(hidden_states)
        return torch.cat(parts, dim=-2)
    # the probe runs the module itself (this forward): at most one chunk, so that it is not chunked
    fused = fused_gated_mlp(mlp, hidden_states[..., :min(PROBE_POSITIONS, chunk_tokens), :])
    try:
        return _fill_by_chunks(forward if fused is None else fused, hidden_states, chunk_tokens)
    except _NotATensor:
        unchunked.add("not a tensor")
        return forward(hidden_states)


class _NotATensor(Exception):
    """A chunked function returned something other than one tensor."""


def _chunked_norm_forward(norm: NormalizationBridge, chunk_tokens: int, hidden_states: Tensor, **kwargs: Any) -> Tensor:
    inner_hooks = [module for module in norm.modules()
                   if isinstance(module, HookPoint) and module not in (norm.hook_in, norm.hook_out)]
    if (hidden_states.shape[-2] <= chunk_tokens or (torch.is_grad_enabled() and hidden_states.requires_grad)
            or any(hook.has_hooks() for hook in inner_hooks)):
        return type(norm).forward(norm, hidden_states, **kwargs)
    hidden_states = norm.hook_in(hidden_states)
    if norm.use_native_layernorm_autograd or getattr(norm.config, "layer_norm_folding", False):
        # What _hf_autograd_forward_with_hooks returns when no inner hook edits or reads: the HF
        # norm's output in the input dtype (its float32 hook values are not computed).
        hf_norm = fused_rms_norm(norm.original_component, hidden_states[..., :PROBE_POSITIONS, :])
        hf_norm = norm.original_component if hf_norm is None else hf_norm

        def compute(piece: Tensor) -> Tensor:
            return hf_norm(piece).to(piece.dtype)
    else:
        compute = norm._python_norm_forward
    return norm.hook_out(_fill_by_chunks(compute, hidden_states, chunk_tokens))


def _fill_by_chunks(function: Callable[[Tensor], Tensor], hidden_states: Tensor, chunk_tokens: int) -> Tensor:
    """``function`` (position-wise) over ``chunk_tokens`` positions at a time, written into one
    output ``[..., pos, d_out]``: only the output and one chunk's intermediates are alive."""
    seq_len, output = hidden_states.shape[-2], None
    for start in range(0, seq_len, chunk_tokens):
        part = function(hidden_states[..., start:start + chunk_tokens, :])
        if not isinstance(part, Tensor):
            raise _NotATensor
        if output is None:
            output = part.new_empty((*part.shape[:-2], seq_len, part.shape[-1]))
        output[..., start:start + chunk_tokens, :] = part
        del part
    return output
