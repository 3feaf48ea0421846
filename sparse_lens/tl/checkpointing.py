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

Two further cuts make the backward fit at a million tokens (measured on the CPU in residual-stream
copies ``R = [batch, T, d_model]``, ``tests/tl/test_checkpointing.py``):

- **Sequence-chunked norms.** TransformerLens' normalization bridges compute RMSNorm/LayerNorm in
  fp32 over the whole sequence; their backward held seven fp32 ``[T, d_model]`` temporaries
  (14 R, the peak of a block's backward). Inside the context every block norm and the final norm
  run ``chunk_tokens`` positions at a time, each chunk checkpointed like an MLP chunk; hooks
  ``hook_in``/``hook_out`` still see whole-sequence tensors. A norm whose inner hooks
  (``hook_scale``, ``hook_normalized``) carry hooks runs unchunked, so those hooks see what they
  always saw.
- **Segments of blocks (sqrt checkpointing, Chen et al. 2016).** With ``segment_layers=k`` the
  forward keeps only the input of every k-th block (one checkpoint per segment of k blocks); the
  backward recomputes a segment (keeping its k block inputs), then each of its blocks. Memory:
  ``n_layers / k + k`` block inputs instead of ``n_layers``, for one more forward of every block
  (``segment_layers="sqrt"``: ``k = ceil(sqrt(n_layers))``, e.g. 5 + 6 = 11 instead of 28 for
  Qwen2.5-1.5B). :func:`segments` names the segments; ``blocks.{last}.hook_resid_post`` of a
  segment is its output, whose gradient arrives before any of the segment's blocks is
  recomputed (attribution patching recomputes its corrupted run there).

The recomputations reuse the block selection of the first pass (:func:`remembered_selection`)
instead of running the estimator again: identical results, about half of each recomputed forward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.checks import is_int_at_least

_STATE_ATTRIBUTE = "_sparse_lens_recompute"
DEFAULT_CHUNK_TOKENS = 65_536  # norm chunk when the model sets no mlp_chunk_tokens
STATE_ATTRIBUTE_OF_ATTENTION = "recompute_state"  # an attention bridge's RecomputeState while installed
_NORM_FORWARDS = ("_python_norm_forward", "_hf_autograd_forward_with_hooks")  # between hook_in and hook_out


@dataclass
class RecomputeState:
    """Per-model state of block checkpointing: whether it is installed, and whether a checkpointed
    region is being recomputed right now (inside the backward)."""

    installed: bool = False
    offload: bool = False
    recomputing: bool = False
    passed_through: set[int] = field(default_factory=set)  # blocks a segment already ran in this forward
    memo: dict | None = None  # block selections of the checkpointed call running now (see remembered_selection)


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
    function: Callable, state: RecomputeState, args: tuple, kwargs: dict | None = None, *, offload: bool = False,
    memo: dict | None = None,
) -> Any:
    """``function(*args, **kwargs)`` under non-reentrant checkpointing (when gradients are on);
    the recomputation runs with ``state.recomputing = True``. The positional tensor arguments are
    the saved inputs (kept in host memory with ``offload``); ``kwargs`` are held as they are.
    ``memo``: the dict of block selections its passes share (default: the enclosing call's)."""
    kwargs = kwargs or {}
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    calls = [0]
    memo = state.memo if memo is None else memo

    def run(*run_args: Any, **run_kwargs: Any) -> Any:
        calls[0] += 1
        previous = state.recomputing, state.memo
        state.recomputing, state.memo = state.recomputing or calls[0] > 1, memo
        try:
            return function(*run_args, **run_kwargs)
        finally:
            state.recomputing, state.memo = previous

    saving = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else contextlib.nullcontext()
    with saving:
        return checkpoint(run, *args, use_reentrant=False, **kwargs)


def remembered_selection(state: RecomputeState | None, key: Any, select: Callable[[], Tensor]) -> Tensor:
    """The block selection of attention layer ``key``: ``select()`` (the estimator) on the first pass
    of a checkpointed call, remembered there; its recomputations in the backward reuse it instead of
    estimating again (the estimator is deterministic: no result changes, about half a forward's
    time is saved per recomputation). Outside checkpointed calls: ``select()``."""
    memo = None if state is None else state.memo
    if memo is None:
        return select()
    if state.recomputing and key in memo:
        return memo[key]
    memo[key] = selection = select()
    return selection


def layer_types(model: Any) -> list | None:
    """The HF config's ``layer_types`` (e.g. sliding and full attention layers), or None."""
    return getattr(getattr(getattr(model, "original_model", None), "config", None), "layer_types", None)


def segments(n_layers: int, segment_layers: int | Literal["sqrt"] | None, types: list | None = None) -> list[range]:
    """The layer ranges checkpointed together: ``segment_layers`` consecutive blocks each (the last
    one shorter), ``"sqrt"``: ``ceil(sqrt(n_layers))`` blocks, ``None`` or 1: one block each. With
    ``types`` (one per layer, :func:`layer_types`) a segment is also cut where the type changes: a
    segment's blocks share one set of keyword arguments, hence one attention mask."""
    ranges = _equal_segments(n_layers, segment_layers)
    if types is None or len(types) < n_layers:
        return ranges
    cut = []
    for layers in ranges:
        start = layers[0]
        for layer in layers[1:]:
            if types[layer] != types[layer - 1]:
                cut.append(range(start, layer))
                start = layer
        cut.append(range(start, layers[-1] + 1))
    return cut


def _equal_segments(n_layers: int, segment_layers: int | Literal["sqrt"] | None) -> list[range]:
    if segment_layers == "sqrt":
        segment_layers = math.ceil(math.sqrt(n_layers))
    if segment_layers is None:
        segment_layers = 1
    if not is_int_at_least(segment_layers, 1):
        raise InvalidConfigError(f"segment_layers must be a positive int, 'sqrt' or None, got {segment_layers!r}.")
    return [range(start, min(start + segment_layers, n_layers)) for start in range(0, n_layers, segment_layers)]


def _block_call_kwargs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block input made positional (a saved input of the checkpoint), and no KV cache: a
    checkpointed forward would append to it twice (forward and recomputation)."""
    if not args and "hidden_states" in kwargs:
        args = (kwargs.pop("hidden_states"),)
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _checkpointed_block_forward(forward: Callable, state: RecomputeState, *args: Any, **kwargs: Any) -> Any:
    if state.recomputing or not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    args, kwargs = _block_call_kwargs(args, kwargs)
    return checkpointed_call(forward, state, args, kwargs, offload=state.offload, memo={})


def _segment_forward(forwards: list[Callable], layers: range, state: RecomputeState, *args: Any, **kwargs: Any) -> Any:
    """Installed on a segment's first block: runs the whole segment under one checkpoint, each
    block under its own inside it (also when the segment is recomputed); the segment's other
    blocks then pass their input through (:func:`_passed_through_block`). Every block of the
    segment gets the first block's keyword arguments (position embeddings, ids, mask): segments are
    cut where the config's ``layer_types`` change (:func:`segments`), so they share one mask."""
    if state.recomputing or not torch.is_grad_enabled():
        return forwards[layers[0]](*args, **kwargs)
    args, kwargs = _block_call_kwargs(args, kwargs)

    def run_segment(hidden: Tensor, **block_kwargs: Any) -> Any:
        for layer in layers:
            output = checkpointed_call(forwards[layer], state, (hidden,), dict(block_kwargs))
            hidden = output[0] if isinstance(output, tuple) else output  # HF versions whose layers return tuples
        return output

    output = checkpointed_call(run_segment, state, args, kwargs, offload=state.offload, memo={})
    state.passed_through.update(layers[1:])
    return output


def _passed_through_block(forward: Callable, layer: int, state: RecomputeState, *args: Any, **kwargs: Any) -> Any:
    """A segment's later block, called by the model's layer loop: its segment already ran it."""
    if layer in state.passed_through:
        state.passed_through.discard(layer)
        return args[0] if args else kwargs["hidden_states"]
    return forward(*args, **kwargs)


def _chunked_norm(forward: Callable, chunk_tokens: int, state: RecomputeState, inner_hooks: list[HookPoint],
                  hidden_states: Tensor) -> Tensor:
    """A norm bridge's computation over ``chunk_tokens`` positions at a time (checkpointed with
    gradients), unless the sequence is short or a hook sits inside it (see the module docstring)."""
    if hidden_states.shape[-2] <= chunk_tokens or any(hook.has_hooks() for hook in inner_hooks):
        return forward(hidden_states)
    pieces = hidden_states.split(chunk_tokens, dim=-2)
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return torch.cat([checkpointed_call(forward, state, (piece,)) for piece in pieces], dim=-2)
    return torch.cat([forward(piece) for piece in pieces], dim=-2)


def position_wise_norms(model: Any) -> list[NormalizationBridge]:
    """The norm bridges acting on the residual stream: each block's direct norms and the final one."""
    norms = [module for block in model.blocks for module in block.children() if isinstance(module, NormalizationBridge)]
    final = getattr(model, "ln_final", None)
    return norms + ([final] if isinstance(final, NormalizationBridge) else [])


def _install_chunked_norms(model: Any, chunk_tokens: int, state: RecomputeState) -> list[NormalizationBridge]:
    norms = position_wise_norms(model)
    for norm in norms:
        inner = [m for m in norm.modules() if isinstance(m, HookPoint) and m not in (norm.hook_in, norm.hook_out)]
        for name in _NORM_FORWARDS:
            norm.__dict__.pop(name, None)
            norm.__dict__[name] = partial(_chunked_norm, getattr(norm, name), chunk_tokens, state, inner)
    return norms


def memory_advice(layer_ranges: list[range], offload: bool) -> str:
    """What to change when a lean backward runs out of device memory (added as a note to the
    ``OutOfMemoryError``): the backward recomputes one segment at a time, on its blocks' device."""
    widest = max(len(layers) for layers in layer_ranges)
    advice = (f"sparse_lens: the lean backward recomputes one checkpoint segment at a time (here up to {widest} "
              f"blocks; {len(layer_ranges)} segments), all of it on that segment's device, however the layers are "
              "spread over devices. Lower segment_layers")
    advice += f" (e.g. segment_layers={max(1, widest // 2)})" if widest > 1 else ""
    if not offload:
        advice += ", set offload=True (segment inputs in host memory; offload_activations=True too in attribution)"
    return advice + ", or keep fewer positions."


@contextlib.contextmanager
def checkpoint_blocks(
    model: Any,
    *,
    offload: bool = False,
    segment_layers: int | Literal["sqrt"] | None = "sqrt",
    chunk_tokens: int | None = None,
) -> Iterator[RecomputeState]:
    """Checkpoint every block of ``model`` (a TransformerLens bridge) while the context is open.

    Args:
        model: A ``HookedSparseTransformer`` or any ``TransformerBridge`` (``model.blocks``).
        offload: Keep the checkpointed block (or segment) inputs in host memory (pinned when CUDA
            is available).
        segment_layers: Blocks per outer checkpoint (module docstring): an int, ``"sqrt"``
            (``ceil(sqrt(n_layers))``, the default) or None (each block alone).
        chunk_tokens: Positions per norm chunk (default: ``model.mlp_chunk_tokens``, else 65,536).

    Results do not change (the recomputation is deterministic: the estimator and the attention
    forward have no atomics); only memory and time do (about one extra forward in the backward,
    two with segments). Entering it while it is already installed on ``model`` changes nothing
    (the outer one rules). Forwards without gradients run as without it (norms chunked).

    Raises:
        torch.OutOfMemoryError: raised inside the context, re-raised as it is with a note
            (:func:`memory_advice`, Python 3.11+) on what to lower: ``segment_layers``, ``offload``.
    """
    state = recompute_state(model)
    if state.installed:
        yield state
        return
    chunk_tokens = chunk_tokens or getattr(model, "mlp_chunk_tokens", None) or DEFAULT_CHUNK_TOKENS
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    blocks = list(model.blocks)
    layer_ranges = segments(len(blocks), segment_layers, layer_types(model))
    state.installed, state.offload, state.recomputing = True, offload, False
    state.passed_through.clear()
    for block in blocks:
        block.__dict__.pop("forward", None)
    forwards = [block.forward for block in blocks]  # the classes' forwards
    for layers in layer_ranges:
        # Into the instance dict directly: bridge components pass attribute writes to the HF module.
        first = blocks[layers[0]]
        if len(layers) == 1:
            first.__dict__["forward"] = partial(_checkpointed_block_forward, forwards[layers[0]], state)
        else:
            first.__dict__["forward"] = partial(_segment_forward, forwards, layers, state)
        for layer in layers[1:]:
            blocks[layer].__dict__["forward"] = partial(_passed_through_block, forwards[layer], layer, state)
    norms = _install_chunked_norms(model, chunk_tokens, state)
    attentions = [block.attn for block in blocks if hasattr(block, "attn")]
    for attention in attentions:  # read by remembered_selection in the attention's prefill
        attention.__dict__[STATE_ATTRIBUTE_OF_ATTENTION] = state
    try:
        yield state
    except torch.OutOfMemoryError as error:
        if hasattr(error, "add_note"):  # Python 3.11+: the advice shows under the traceback, the type stays
            error.add_note(memory_advice(layer_ranges, offload))
        raise
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        for norm in norms:
            for name in _NORM_FORWARDS:
                norm.__dict__.pop(name, None)
        for attention in attentions:
            attention.__dict__.pop(STATE_ATTRIBUTE_OF_ATTENTION, None)
        state.installed, state.offload, state.recomputing, state.memo = False, False, False, None
        state.passed_through.clear()
