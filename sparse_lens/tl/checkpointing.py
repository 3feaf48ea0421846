"""Activation checkpointing per transformer block: a backward whose memory does not grow with depth.

A plain backward keeps every block's intermediates (q, k, v, attention outputs, MLP activations,
norms) from the forward until the backward reaches that block: about ten ``[T, d_model]``
tensors per layer, 120 GB at 32k tokens on Qwen2.5-1.5B. With :func:`checkpoint_blocks` each
block runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the forward
keeps only the block's input (``blocks.{l}.hook_resid_pre``, one ``[batch, T, d_model]`` per
layer) and the backward recomputes the block's forward just before differentiating it, so one
block's intermediates are alive at a time. ``offload=True`` keeps those block inputs in host
memory instead (``torch.autograd.graph.save_on_cpu``, pinned when CUDA is available), copied
back when the block is recomputed. MLP chunking (``model.mlp_chunk_tokens``) checkpoints each
chunk too, so the MLP's ``[T, d_mlp]`` intermediates are never alive for the whole sequence.

A checkpointed forward with gradients fills no KV cache (HF's ``DynamicCache`` would be appended
to twice); pass ``use_cache=False`` to forwards whose cache nobody reads anyway: HF builds one by
default, ``n_layers x T x 2 d_kv`` (29 GB at 1M tokens on Qwen2.5-1.5B in bf16).

Hooks fire again during the recomputation. The recomputed forward must do what the first one
did (same edits, same patterns), so hooks stay installed until the backward is over (use
``model.hooks(...)`` around forward *and* backward, not ``run_with_hooks``). Hooks that record
something or create leaf tensors should act on the first pass only: :func:`is_recomputing`
tells them which pass they are in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

_STATE_ATTRIBUTE = "_sparse_lens_recompute"


@dataclass
class RecomputeState:
    """Per-model state of block checkpointing: whether it is installed, and whether a checkpointed
    region is being recomputed right now (inside the backward)."""

    installed: bool = False
    offload: bool = False
    recomputing: bool = False


def recompute_state(model: Any) -> RecomputeState:
    """The model's :class:`RecomputeState` (created on first use; one per model, no global state)."""
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        state = RecomputeState()
        model.__dict__[_STATE_ATTRIBUTE] = state
    return state


def is_recomputing(model: Any) -> bool:
    """True while a checkpointed block (or MLP chunk) of ``model`` reruns its forward in the backward."""
    return recompute_state(model).recomputing


def checkpointed_call(
    function: Callable, state: RecomputeState, args: tuple, kwargs: dict | None = None, *, offload: bool = False
) -> Any:
    """``function(*args, **kwargs)`` under non-reentrant checkpointing (when gradients are on);
    the recomputation runs with ``state.recomputing = True``. The positional tensor arguments are
    the saved inputs (kept in host memory with ``offload``); ``kwargs`` are held as they are."""
    kwargs = kwargs or {}
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    calls = [0]

    def run(*run_args: Any, **run_kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return function(*run_args, **run_kwargs)
        previous, state.recomputing = state.recomputing, True
        try:
            return function(*run_args, **run_kwargs)
        finally:
            state.recomputing = previous

    saving = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else contextlib.nullcontext()
    with saving:
        return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _checkpointed_block_forward(forward: Callable, state: RecomputeState, *args: Any, **kwargs: Any) -> Any:
    if state.recomputing or not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if not args and "hidden_states" in kwargs:  # the block input must be positional to be a saved input
        args = (kwargs.pop("hidden_states"),)
    # A KV cache would be appended to twice (forward and recomputation): a checkpointed forward fills none.
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return checkpointed_call(forward, state, args, kwargs, offload=state.offload)


@contextlib.contextmanager
def checkpoint_blocks(model: Any, *, offload: bool = False) -> Iterator[RecomputeState]:
    """Checkpoint every block of ``model`` (a TransformerLens bridge) while the context is open.

    Args:
        model: A ``HookedSparseTransformer`` or any ``TransformerBridge`` (``model.blocks``).
        offload: Keep the checkpointed block inputs in host memory (pinned when CUDA is available).

    Results do not change (the recomputation is deterministic: the estimator and the attention
    forward have no atomics); only memory and time do (about one extra forward in the backward).
    Entering it while it is already installed on ``model`` changes nothing (the outer one rules).
    Forwards without gradients run exactly as without it.
    """
    state = recompute_state(model)
    if state.installed:
        yield state
        return
    blocks = list(model.blocks)
    state.installed, state.offload, state.recomputing = True, offload, False
    for block in blocks:
        block.__dict__.pop("forward", None)
        # Into the instance dict directly: bridge components pass attribute writes to the HF module.
        block.__dict__["forward"] = partial(_checkpointed_block_forward, block.forward, state)
    try:
        yield state
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        state.installed, state.offload, state.recomputing = False, False, False
