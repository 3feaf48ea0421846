"""Attribution patching (Nanda 2023; Syed, Rager and Conmy 2023): every patching effect at once,
from two forwards and one backward, with memory linear in the sequence length.

Activation patching measures ``metric(clean run with activation a set to its corrupted value) -
metric(clean run)`` by one forward per activation. Attribution patching replaces it by its
first-order estimate around the clean run::

    effect(a) ~ sum over a's elements of  d metric / d a (clean run)  *  (a_corrupted - a_clean)

Here, with ``metric`` read on the clean run's logits:

- ``head_out[layer, head]``: ``a`` = head ``head``'s output ``blocks.{layer}.attn.hook_z`` at every
  position (TransformerLens' ``get_act_patch_attn_head_out_all_pos``, ``[layer, head]``);
- ``resid_pre[layer, span]``: ``a`` = the residual stream ``blocks.{layer}.hook_resid_pre`` over
  the positions of one span (``get_act_patch_resid_pre`` per position, ``[layer, pos]``, summed
  over the span's positions);
- ``block_gate[layer, batch, head, query_block, slot]`` (sparse mode): ``a`` = the gate of one kept
  (query block, key block) of the clean run's pattern, and the counterfactual is removing the
  block (gate 1 -> 0, the softmax not renormalised), so the estimate is ``-d metric / d gate``;
  this needs no corrupted run, as :func:`~sparse_lens.analysis.interventions.block_attribution`.

How it runs, and its memory (``R`` = one ``[batch, T, d_model]`` residual-stream copy):

1. the corrupted forward (no gradients) keeps only the residual stream entering each segment of
   ``segment_layers`` blocks (``n_layers / k`` copies; in host memory with
   ``offload_activations=True``) and the blocks' keyword arguments (position embeddings);
2. the clean forward, with gradients, under activation checkpointing by segments of blocks
   (:mod:`sparse_lens.tl.checkpointing`: ``n_layers / k`` segment inputs, in host memory with
   ``offload=True``), each hook registering a gradient hook on the clean activation; logits are
   built at ``positions`` only;
3. one backward. When the gradient reaches a segment's output (before any of its blocks is
   recomputed), the corrupted run of that segment is recomputed from its stored input, keeping
   its ``k`` corrupted activations; when a clean block is recomputed, its hooks subtract the clean
   activations from them in place; when the gradient of a layer's activation arrives, its hook reduces
   ``gradient * (corrupted - clean)`` to one number per head (per position for the residual
   stream) and frees both.

So the peak holds ``2 n_layers / k + 2 k`` residual copies (22 for 28 layers, ``k = 6``) plus one
block's recompute and backward, instead of a corrupted activation and a block input per layer
(56). The corrupted run costs two forwards, the clean one three (forward, segment and block
recomputations), with one backward.

Sign and scale: the results estimate ``metric(patched) - metric(clean)`` (a "noising" effect). To
read them as TransformerLens tutorials normalise, divide by ``corrupted_metric - clean_metric``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.analysis.positions import call_metric, kept_positions, logits_kwargs
from sparse_lens.analysis.span_patching import block_spans, check_spans
from sparse_lens.errors import GradientModeError, InvalidConfigError, ShapeError
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.checkpointing import checkpoint_blocks, is_recomputing, layer_types, recompute_state, segments

Span = tuple[int, int]
_CHUNK = 65_536  # positions reduced at a time (fp32 products of one chunk only) without mlp_chunk_tokens


@dataclass(frozen=True)
class AttributionPatching:
    """Linear estimates of ``metric(clean with one activation corrupted) - metric(clean)``.

    Attributes:
        head_out: ``[layer, head]``, each head's ``hook_z`` at all positions (None if not asked).
        resid_pre: ``[layer, span]``, ``hook_resid_pre`` over each span (None without spans).
        spans: The ``[start, end)`` token ranges of ``resid_pre``'s columns.
        block_gate: ``[layer, batch, head, n_query_blocks, top_k]``, removing each kept block of the
            clean run (``-d metric / d gate``); 0 on unused slots (None if not asked).
        block_indices: The clean run's kept key blocks, same shape, ``-1`` = unused slot.
        clean_metric, corrupted_metric: ``metric`` on the clean and on the corrupted run.
    """

    head_out: Float[Tensor, "layer head"] | None
    resid_pre: Float[Tensor, "layer span"] | None
    spans: list[Span]
    block_gate: Float[Tensor, "layer batch head n_query_blocks top_k"] | None
    block_indices: Int[Tensor, "layer batch head n_query_blocks top_k"] | None
    clean_metric: float
    corrupted_metric: float

    def top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` heads with the largest |estimate|: ``(layer, head, estimate)``."""
        if self.head_out is None:
            return []
        flat = self.head_out.flatten()
        order = flat.abs().argsort(descending=True)[:n].tolist()
        n_heads = self.head_out.shape[1]
        return [(index // n_heads, index % n_heads, float(flat[index])) for index in order]


def attribution_patching(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Tensor], Tensor],
    *,
    positions: Sequence[int] | Tensor | None = None,
    heads: bool = True,
    spans: Iterable[Span] | int | None = None,
    gates: bool = False,
    corrupted_fwd_hooks: Sequence[tuple[str, Callable]] = (),
    checkpoint: bool = True,
    offload: bool = False,
    offload_activations: bool = False,
    segment_layers: int | Literal["sqrt"] = "sqrt",
) -> AttributionPatching:
    """Attribution patching of every head output, residual-stream span and (sparse) kept block.

    Args:
        model: A ``HookedSparseTransformer`` (``mode="sparse"`` or ``"dense"``) or a dense
            TransformerLens ``TransformerBridge``.
        clean_tokens, corrupted_tokens: Token ids of the same shape ``[batch, pos]``.
        metric: Logits -> a scalar tensor (differentiable). It receives ``[batch, pos, d_vocab]``
            logits, or ``[batch, len(positions), d_vocab]`` (the kept positions, in order) with
            ``positions``. Reading past the kept positions raises ``LogitsNotKeptError``.
        positions: Positions whose logits the metric reads (``None``: all; at long contexts keep
            few, e.g. ``[-1]``: the full logits are ``T x d_vocab``).
        heads: Estimate every head's ``hook_z`` (``head_out``).
        spans: ``[start, end)`` token ranges for ``resid_pre`` (an int: consecutive spans of that
            many tokens, e.g. the key block), or None to skip the residual stream.
        gates: Estimate removing every kept block (``block_gate``; ``mode="sparse"`` only).
        corrupted_fwd_hooks: Extra TransformerLens hooks for the corrupted run only (e.g. noise
            added to ``hook_embed``: a corruption that is not a token change). They run again
            when a segment of the corrupted run is recomputed (from its first block on).
        checkpoint: Checkpoint the clean run by segments of blocks (recompute in the backward).
            Off: the plain backward (the corrupted run is still recomputed by segments).
        offload: Keep the clean run's segment checkpoints in host memory.
        offload_activations: Keep the corrupted run's segment inputs in host memory.
        segment_layers: Blocks per segment (an int, or ``"sqrt"``: ``ceil(sqrt(n_layers))``).
            The backward holds one segment's recomputation at a time, on its blocks' devices:
            with layers across GPUs that is one GPU's worth, whatever the split; fewer blocks per
            segment need less of it (the 8B shape at 1M tokens over two H200s: 3, not "sqrt").

    Raises:
        GradientModeError: ``mode="observe"``, or ``gates`` outside ``mode="sparse"``.
        ShapeError: token shapes differ.
        InvalidPositionsError: bad positions.
        InvalidSpanError: an empty span, one outside the sequence, or an empty list of spans.
        LogitsNotKeptError: the metric read a position whose logits were not kept.
        InvalidConfigError (a ``ValueError``): nothing to estimate, a bad ``segment_layers``, or
            offloading asked for without checkpointing.
    """
    check_gradient_mode(model, gates=gates)
    if clean_tokens.shape != corrupted_tokens.shape or clean_tokens.ndim != 2:
        raise ShapeError(
            f"clean and corrupted tokens must both be [batch, pos] of one shape, got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}."
        )
    seq_len = clean_tokens.shape[1]
    index = kept_positions(positions, seq_len, device=clean_tokens.device)
    span_list = [] if spans is None else (block_spans(seq_len, spans) if isinstance(spans, int) else check_spans(spans, seq_len))
    if not (heads or span_list or gates):
        raise InvalidConfigError("attribution_patching: nothing to estimate (heads=False, no spans, gates=False).")
    if (offload or offload_activations) and not checkpoint:
        raise InvalidConfigError("attribution_patching: offload / offload_activations keep checkpoints in host "
                                 "memory; with checkpoint=False there are none (set checkpoint=True).")
    n_layers = model.cfg.n_layers
    layer_ranges = segments(n_layers, segment_layers, layer_types(model))  # the clean run's segments too
    names = {layer: ([f"blocks.{layer}.attn.hook_z"] if heads else [])
             + ([f"blocks.{layer}.hook_resid_pre"] if span_list else []) for layer in range(n_layers)}
    run = _Runs(model, layer_ranges, offload_activations)
    chunk = getattr(model, "mlp_chunk_tokens", None) or _CHUNK  # positions per fp32 product chunk

    head_scores = torch.zeros(n_layers, model.cfg.n_heads, dtype=torch.float64)
    position_scores = torch.zeros(n_layers, seq_len, dtype=torch.float64)
    leaf: dict[str, Tensor] = {}
    gate_hooks = GateHooks(model) if gates else None

    def difference_hook(layer: int, name: str) -> Callable:
        def hook(value: Tensor, hook) -> Tensor:
            if not value.requires_grad:
                return value
            if not is_recomputing(model):
                value.register_hook(partial(reduce, layer, name))
            if not checkpoint:  # the plain backward: the corrupted value comes later, in the backward
                run.clean[name] = value.detach()
            elif is_recomputing(model) and name in run.corrupted:  # the first recomputation of its block
                corrupted = run.corrupted.pop(name)
                run.differences[name] = corrupted.sub_(value.detach().to(corrupted.dtype))
            return value

        return hook

    def reduce(layer: int, name: str, grad: Tensor) -> None:
        if name in run.differences:
            delta = run.differences.pop(name)
        elif name in run.corrupted and name in run.clean:
            delta = run.corrupted.pop(name)
            delta.sub_(run.clean.pop(name).to(delta.dtype))
        else:
            raise RuntimeError(f"attribution_patching: {name}'s gradient arrived before its corrupted and clean "
                               "values were known.")
        if name.endswith("hook_z"):
            head_scores[layer] += _products_per_head(grad, delta, chunk).double().cpu()
        else:
            position_scores[layer] += _products_per_position(grad, delta, chunk).double().cpu()

    def segment_output_hook(layers: range) -> Callable:
        def hook(value: Tensor, hook) -> Tensor:
            if value.requires_grad and not is_recomputing(model):
                value.register_hook(lambda grad: run.corrupted_segment(layers, names))
            return value

        return hook

    def embed_leaf(value: Tensor, hook) -> Tensor:
        leaf["embed"] = value.detach().requires_grad_(True)
        return leaf["embed"]

    clean_hooks: list[tuple[str, Callable]] = [("hook_embed", embed_leaf)]
    for layer in range(n_layers):
        clean_hooks += [(name, difference_hook(layer, name)) for name in names[layer]]
    if heads or span_list:  # gates alone need no corrupted activation
        clean_hooks += [(f"blocks.{layers[-1]}.hook_resid_post", segment_output_hook(layers)) for layers in layer_ranges]
    if gate_hooks is not None:
        clean_hooks += gate_hooks.hooks()
    checkpointing = checkpoint_blocks(model, offload=offload, segment_layers=segment_layers) if checkpoint \
        else contextlib.nullcontext()
    with checkpointing, run.hooks(clean_hooks, corrupted_fwd_hooks, names), _no_parameter_gradients(model):
        # 1. The corrupted run keeps its segment inputs (no gradients: blocks run plainly).
        with torch.no_grad():
            corrupted_metric = float(call_metric(metric, run.corrupted_forward(corrupted_tokens, index), index))
        # 2. + 3. The clean run with gradients; gradient hooks reduce gradient x difference per layer.
        with torch.enable_grad():
            value = call_metric(metric, model(clean_tokens, use_cache=False, **logits_kwargs(index)), index)
            inputs = [leaf["embed"]] + (gate_hooks.gate_list() if gate_hooks is not None else [])
            gradients = torch.autograd.grad(value, inputs, allow_unused=True)
    run.clear()

    block_gate = block_indices = None
    if gate_hooks is not None:
        block_indices = torch.stack(gate_hooks.index_list())
        block_gate = torch.stack([
            torch.zeros_like(gate) if grad is None else -grad * (indices >= 0)
            for gate, grad, indices in zip(gate_hooks.gate_list(), gradients[1:], gate_hooks.index_list())
        ])
    resid_pre = None
    if span_list:
        prefix = torch.nn.functional.pad(position_scores.cumsum(-1), (1, 0))
        starts = torch.tensor([start for start, _ in span_list])
        ends = torch.tensor([end for _, end in span_list])
        resid_pre = (prefix[:, ends] - prefix[:, starts]).float()
    return AttributionPatching(
        head_out=head_scores.float() if heads else None,
        resid_pre=resid_pre,
        spans=span_list,
        block_gate=block_gate,
        block_indices=block_indices,
        clean_metric=float(value.detach()),
        corrupted_metric=corrupted_metric,
    )


class _Runs:
    """The two runs of one attribution: which one the hooks serve (``corrupted_phase``), the
    corrupted run's segment inputs and block keyword arguments, and the activations waiting for
    their gradient (``corrupted``: a segment's corrupted values; ``differences``: corrupted - clean,
    made in place when the clean block is first recomputed; ``clean``: the clean values, plain
    backward only)."""

    def __init__(self, model: Any, layer_ranges: list[range], offload: bool) -> None:
        self.model, self.layer_ranges, self.offload = model, layer_ranges, offload
        self.corrupted_phase = False
        self.rerunning = False  # a segment of the corrupted run is being recomputed
        self.segment_inputs: dict[int, Tensor] = {}
        self.segment_devices: dict[int, torch.device] = {}  # where each offloaded input came from
        self.block_kwargs: dict[int, dict] = {}
        self.corrupted: dict[str, Tensor] = {}
        self.clean: dict[str, Tensor] = {}
        self.differences: dict[str, Tensor] = {}
        self.selections: dict = {}  # the corrupted forward's block selections, reused by segment reruns

    @contextlib.contextmanager
    def hooks(self, clean_hooks: list, corrupted_hooks: Sequence, names: dict[int, list[str]]) -> Iterator[None]:
        """Every hook of both runs, each active in its own phase; block keyword-argument recorders."""
        keep = [(name, self._keeper(name)) for layer_names in names.values() for name in layer_names]
        starts = [(f"blocks.{layers[0]}.hook_resid_pre", self._segment_input(layers[0])) for layers in self.layer_ranges
                  if any(names.values())]
        fwd_hooks = [(name, self._in_phase(hook, False)) for name, hook in clean_hooks]
        fwd_hooks += [(name, self._in_phase(hook, True)) for name, hook in [*corrupted_hooks, *keep, *starts]]
        handles = [block.register_forward_pre_hook(partial(self._record_kwargs, layer), with_kwargs=True)
                   for layer, block in enumerate(self.model.blocks)]
        try:
            with self.model.hooks(fwd_hooks=fwd_hooks):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def corrupted_forward(self, tokens: Tensor, index: Tensor | None) -> Tensor:
        """The corrupted forward (call without gradients): its logits at ``index``."""
        self.corrupted_phase = True
        state = recompute_state(self.model)
        state.memo = self.selections  # remembered by the attention layers (with checkpoint_blocks installed)
        try:
            return self.model(tokens, use_cache=False, **logits_kwargs(index))
        finally:
            self.corrupted_phase, state.memo = False, None

    def corrupted_segment(self, layers: range, names: dict[int, list[str]]) -> None:
        """Rerun the corrupted run's blocks ``layers`` from their stored input (no gradients),
        keeping their activations named in ``names`` in ``self.corrupted``."""
        hidden = self.segment_inputs.pop(layers[0])
        if self.offload:  # back to the device the block ran on (layers across GPUs: not always cfg.device)
            hidden = hidden.to(self.segment_devices.pop(layers[0]), non_blocking=True)
        self.corrupted_phase = self.rerunning = True
        state = recompute_state(self.model)
        previous = state.recomputing, state.memo
        state.recomputing, state.memo = True, self.selections  # a recomputation: the same block selections
        try:
            with torch.no_grad():
                for layer in layers:
                    output = self.model.blocks[layer](hidden, **self.block_kwargs[layer])
                    hidden = output[0] if isinstance(output, tuple) else output
        finally:
            self.corrupted_phase = self.rerunning = False
            state.recomputing, state.memo = previous

    def clear(self) -> None:
        self.segment_inputs.clear()
        self.segment_devices.clear()
        self.block_kwargs.clear()
        self.corrupted.clear()
        self.clean.clear()
        self.differences.clear()
        self.selections.clear()

    def _in_phase(self, function: Callable, corrupted: bool) -> Callable:
        def gated(value: Any, hook: Any) -> Any:
            return function(value, hook=hook) if self.corrupted_phase == corrupted else value

        return gated

    def _keeper(self, name: str) -> Callable:
        def keep(value: Tensor, hook) -> Tensor:
            if self.rerunning:  # a fresh tensor nothing else uses after the rerun: the difference goes into it
                self.corrupted[name] = value.detach()
            return value

        return keep

    def _segment_input(self, layer: int) -> Callable:
        def keep(value: Tensor, hook) -> Tensor:
            if not self.rerunning:
                if self.offload:  # one copy, straight into pinned host memory (read back without blocking)
                    kept = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda).copy_(value.detach())
                    self.segment_devices[layer] = value.device
                else:
                    kept = value.detach().clone()
                self.segment_inputs[layer] = kept
            return value

        return keep

    def _record_kwargs(self, layer: int, module: Any, args: tuple, kwargs: dict) -> None:
        if self.corrupted_phase and layer not in self.block_kwargs:
            self.block_kwargs[layer] = {name: value for name, value in kwargs.items() if name != "hidden_states"}


# ----- shared with block_attribution ---------------------------------------------------------------
def check_gradient_mode(model: Any, *, gates: bool) -> None:
    """Raise ``GradientModeError`` if the model's mode cannot give the gradients asked for."""
    stream = getattr(model, "stream", None)
    mode = "dense" if stream is None else stream.mode
    if mode == "observe":
        raise GradientModeError(
            "Gradients in mode='observe' would differentiate its chunked dense attention (quadratic "
            "memory in the backward); use mode='sparse' (or mode='dense' for the dense reference)."
        )
    if gates and mode != "sparse":
        raise GradientModeError(
            f"Block gates exist only on the sparse attention; this model runs mode={mode!r}. Use mode='sparse'."
        )


class GateHooks:
    """``hook_pattern`` hooks putting a gate of ones (a leaf needing grad) on every kept block.

    The first pass creates one gate per layer and records the kept blocks; when a checkpointed
    block is recomputed in the backward, its hook puts the *same* gate on the recomputed pattern
    and checks that the kept blocks are the same (they are: the estimate is deterministic)."""

    def __init__(self, model: Any, layers: Sequence[int] | None = None) -> None:
        self.model = model
        self.layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        self.gates: dict[int, Tensor] = {}
        self.indices: dict[int, Tensor] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(f"blocks.{layer}.attn.hook_pattern", self._hook(layer)) for layer in self.layers]

    def gate_list(self) -> list[Tensor]:
        return [self.gates[layer] for layer in self.layers]

    def index_list(self) -> list[Tensor]:
        return [self.indices[layer] for layer in self.layers]

    def _hook(self, layer: int) -> Callable:
        def hook(pattern: BlockSparsePattern, hook) -> BlockSparsePattern:
            if layer in self.gates:
                if not torch.equal(pattern.block_indices, self.indices[layer]):
                    raise RuntimeError(f"layer {layer}: the recomputed forward kept other blocks than the first "
                                       "pass (a non-deterministic estimate); gradients would be wrong.")
                return pattern.with_gate(self.gates[layer])
            self.gates[layer] = torch.ones_like(pattern.block_mass, requires_grad=True)
            self.indices[layer] = pattern.block_indices
            return pattern.with_gate(self.gates[layer])

        return hook


@contextlib.contextmanager
def _no_parameter_gradients(model: Any) -> Iterator[None]:
    """Parameters need no gradient while the context is open (restored after): nothing is saved for
    weight gradients nobody asked for (2 residual copies less per block in the backward)."""
    needing = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in needing:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in needing:
            parameter.requires_grad_(True)


def _products_per_head(
    grad: Float[Tensor, "batch pos head d_head"], delta: Float[Tensor, "batch pos head d_head"], chunk: int
) -> Float[Tensor, "head"]:
    """``sum over batch, pos, d_head of grad * delta`` in fp32, ``chunk`` positions at a time."""
    total = torch.zeros(grad.shape[2], dtype=torch.float32, device=grad.device)
    for start in range(0, grad.shape[1], chunk):
        part = slice(start, start + chunk)
        total += (grad[:, part].float() * delta[:, part].float()).sum(dim=(0, 1, 3))
    return total


def _products_per_position(
    grad: Float[Tensor, "batch pos d_model"], delta: Float[Tensor, "batch pos d_model"], chunk: int
) -> Float[Tensor, "pos"]:
    """``sum over batch and d_model of grad * delta`` per position, in fp32, ``chunk`` positions at a time."""
    return torch.cat([(grad[:, s : s + chunk].float() * delta[:, s : s + chunk].float()).sum(dim=(0, 2))
                      for s in range(0, grad.shape[1], chunk)])
