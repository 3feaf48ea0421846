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

How it runs, and its memory:

1. the corrupted forward (no gradients) keeps the activations asked for (``hook_z`` of every
   layer, ``hook_resid_pre`` of every layer when spans are asked for), on the model's device or in
   host memory (``offload_activations=True``);
2. the clean forward, with gradients, block by block under activation checkpointing
   (:mod:`sparse_lens.tl.checkpointing`): each hook turns the stored corrupted activation into the
   difference ``corrupted - clean`` in place and registers a gradient hook on the clean
   activation; logits are built at ``positions`` only;
3. one backward: when the gradient of a layer's activation arrives, the gradient hook reduces
   ``gradient * difference`` to one number per head (per position for the residual stream) and
   frees that layer's difference.

So the peak holds one ``[batch, T, d_model]`` difference per layer and activation kind (the part
of the corrupted run that the estimate needs), the per-block checkpoints (on the device, or in
host memory with ``offload=True``), and one block's intermediates. No whole-sequence activation
of every layer is kept twice, and no logits beyond ``positions``.

Sign and scale: the results estimate ``metric(patched) - metric(clean)`` (a "noising" effect). To
read them as TransformerLens tutorials normalise, divide by ``corrupted_metric - clean_metric``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.analysis.positions import call_metric, kept_positions, logits_kwargs
from sparse_lens.analysis.span_patching import block_spans, check_spans
from sparse_lens.errors import GradientModeError, ShapeError
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.checkpointing import checkpoint_blocks, is_recomputing

Span = tuple[int, int]
_CHUNK = 65_536  # positions reduced at a time (fp32 products of one chunk only)


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
            added to ``hook_embed``: a corruption that is not a token change).
        checkpoint: Checkpoint every block (recompute in the backward). Off: the plain backward.
        offload: Keep the block checkpoints in host memory.
        offload_activations: Keep the corrupted activations (then the differences) in host memory.

    Raises:
        GradientModeError: ``mode="observe"``, or ``gates`` outside ``mode="sparse"``.
        ShapeError: token shapes differ.
        InvalidPositionsError: bad positions.
        InvalidSpanError: an empty span, one outside the sequence, or an empty list of spans.
        LogitsNotKeptError: the metric read a position whose logits were not kept.
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
        raise ValueError("attribution_patching: nothing to estimate (heads=False, no spans, gates=False).")
    n_layers = model.cfg.n_layers
    names = ([f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)] if heads else []) + (
        [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] if span_list else []
    )
    store_device = torch.device("cpu") if offload_activations else None

    # 1. The corrupted run keeps the activations the estimate needs.
    stored: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable:
        def keep(value: Tensor, hook) -> Tensor:
            kept = value.detach()
            if store_device is not None:
                kept = kept.to(store_device)
                kept = kept.pin_memory() if torch.cuda.is_available() else kept
            else:
                kept = kept.clone()  # the difference is written into it in place
            stored[name] = kept
            return value

        return keep

    with torch.no_grad():
        corrupted_logits = model.run_with_hooks(
            corrupted_tokens, fwd_hooks=list(corrupted_fwd_hooks) + [(name, keeper(name)) for name in names],
            use_cache=False, **logits_kwargs(index),
        )
        corrupted_metric = float(call_metric(metric, corrupted_logits, index))
        del corrupted_logits

    # 2. + 3. The clean run with gradients; gradient hooks reduce gradient x difference per layer.
    head_scores = torch.zeros(n_layers, model.cfg.n_heads, dtype=torch.float64)
    position_scores = torch.zeros(n_layers, seq_len, dtype=torch.float64)
    leaf: dict[str, Tensor] = {}
    gate_hooks = GateHooks(model) if gates else None

    def difference_hook(kind: str, layer: int, name: str):
        def hook(value: Tensor, hook) -> Tensor:
            if is_recomputing(model) or not value.requires_grad:
                return value
            difference = stored[name]
            difference.sub_(value.detach().to(difference.device))

            def reduce(grad: Tensor) -> None:
                delta = stored.pop(name).to(grad.device, non_blocking=True)
                if kind == "z":
                    head_scores[layer] += _products_per_head(grad, delta).double().cpu()
                else:
                    position_scores[layer] += _products_per_position(grad, delta).double().cpu()

            value.register_hook(reduce)
            return value

        return hook

    def embed_leaf(value: Tensor, hook) -> Tensor:
        leaf["embed"] = value.detach().requires_grad_(True)
        return leaf["embed"]

    fwd_hooks: list[tuple[str, Callable]] = [("hook_embed", embed_leaf)]
    for layer in range(n_layers):
        if heads:
            fwd_hooks.append((f"blocks.{layer}.attn.hook_z", difference_hook("z", layer, f"blocks.{layer}.attn.hook_z")))
        if span_list:
            fwd_hooks.append((f"blocks.{layer}.hook_resid_pre",
                              difference_hook("resid", layer, f"blocks.{layer}.hook_resid_pre")))
    if gate_hooks is not None:
        fwd_hooks += gate_hooks.hooks()
    with _maybe_checkpoint(model, checkpoint, offload), model.hooks(fwd_hooks=fwd_hooks), torch.enable_grad():
        value = call_metric(metric, model(clean_tokens, use_cache=False, **logits_kwargs(index)), index)
        inputs = [leaf["embed"]] + (gate_hooks.gate_list() if gate_hooks is not None else [])
        gradients = torch.autograd.grad(value, inputs, allow_unused=True)
    stored.clear()

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


def _maybe_checkpoint(model: Any, checkpoint: bool, offload: bool) -> contextlib.AbstractContextManager:
    return checkpoint_blocks(model, offload=offload) if checkpoint else contextlib.nullcontext()


def _products_per_head(
    grad: Float[Tensor, "batch pos head d_head"], delta: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "head"]:
    """``sum over batch, pos, d_head of grad * delta`` in fp32, ``_CHUNK`` positions at a time."""
    total = torch.zeros(grad.shape[2], dtype=torch.float32, device=grad.device)
    for start in range(0, grad.shape[1], _CHUNK):
        part = slice(start, start + _CHUNK)
        total += torch.einsum("bphd,bphd->h", grad[:, part].float(), delta[:, part].float())
    return total


def _products_per_position(
    grad: Float[Tensor, "batch pos d_model"], delta: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "pos"]:
    """``sum over batch and d_model of grad * delta`` per position, in fp32."""
    parts = [torch.einsum("bpd,bpd->p", grad[:, s : s + _CHUNK].float(), delta[:, s : s + _CHUNK].float())
             for s in range(0, grad.shape[1], _CHUNK)]
    return torch.cat(parts)
