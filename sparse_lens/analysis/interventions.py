"""Interventions on sparse attention: block attribution (gradient x gate) and span suppression.

Both act through ``hook_pattern``: a hook that returns ``pattern.with_gate(gate)`` or
``pattern.with_block_indices(indices)`` makes the layer recompute its attention over that
pattern (sparse mode), so no dense pattern is ever built.

- :func:`block_attribution`: one forward and one backward give, for every kept (query block, key
  block) of every layer and head, ``d metric / d gate`` at ``gate = 1``, where the gate scales the
  block's attention probabilities in the layer's output. That is attribution patching with the
  block removed as the counterfactual: ``metric(gate = 0) - metric(gate = 1) ~ -gradient``.
  (The layer's attention is computed twice in that run: once to find the pattern, once with the
  gate in the autograd graph.) The backward is memory-lean: logits only at ``positions``, every
  block checkpointed (recomputed in the backward, the checkpoints optionally in host memory), see
  :mod:`sparse_lens.tl.checkpointing`.
- :func:`suppress_span`: drop every kept key block overlapping a token span (all or chosen layers
  and heads); the softmax renormalises over what remains, and the change of the next-token
  distribution at later positions is reported (the attention-suppression method of the thought
  anchors paper, on sparse attention).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.analysis.attribution_patching import GateHooks, check_gradient_mode
from sparse_lens.analysis.positions import call_metric, check_indices, kept_positions, logits_kwargs
from sparse_lens.analysis.span_patching import check_spans
from sparse_lens.errors import InvalidPathError, InvalidSpanError
from sparse_lens.kernels.blocks import blocks_overlapping, sort_block_row
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.checkpointing import checkpoint_blocks
from sparse_lens.tl.model import HookedSparseTransformer


@dataclass(frozen=True)
class BlockAttribution:
    """Per layer: the kept blocks and ``d metric / d gate`` for each of them (0 on unused slots).

    ``block_indices[i]`` and ``gradient[i]`` belong to layer ``layers[i]`` (default: layer ``i``,
    every layer in order)."""

    block_indices: list[Int[Tensor, "batch head n_query_blocks top_k"]]
    gradient: list[Float[Tensor, "batch head n_query_blocks top_k"]]
    metric: float
    layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layers:
            object.__setattr__(self, "layers", list(range(len(self.block_indices))))

    def top_blocks(self, n: int = 10) -> list[tuple[int, int, int, int, float]]:
        """The ``n`` blocks with the largest |attribution|: (layer, head, query block, key block, value), batch 0."""
        entries = []
        for layer, indices, gradient in zip(self.layers, self.block_indices, self.gradient):
            flat = gradient[0].abs().flatten()
            for position in flat.topk(min(n, flat.numel())).indices.tolist():
                head, row, slot = torch.unravel_index(torch.tensor(position), gradient[0].shape)
                block = int(indices[0, head, row, slot])
                if block >= 0:
                    entries.append((layer, int(head), int(row), block, float(gradient[0, head, row, slot])))
        return sorted(entries, key=lambda entry: -abs(entry[4]))[:n]


def block_attribution(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Tensor], Tensor],
    layers: Iterable[int] | None = None,
    *,
    positions: Sequence[int] | Tensor | None = None,
    checkpoint: bool = True,
    offload: bool = False,
) -> BlockAttribution:
    """Gradient of ``metric(logits)`` (a scalar) with respect to every kept block's gate, at gate 1.

    Args:
        tokens: Token ids ``[batch, pos]``.
        metric: Logits -> scalar tensor. It receives ``[batch, pos, d_vocab]`` logits, or
            ``[batch, len(positions), d_vocab]`` (the kept positions, in order) with ``positions``.
        layers: Layers whose gates are differentiated (default all).
        positions: Positions whose logits the metric reads (``None``: all). At long contexts pass
            them (e.g. ``[-1]``): the full logits are ``T x d_vocab``.
        checkpoint: Checkpoint every block (the backward recomputes it; memory: one
            ``[batch, T, d_model]`` block input per layer plus one block's intermediates).
        offload: Keep those block inputs in host memory.

    Raises:
        GradientModeError: the model does not run ``mode="sparse"``.
        InvalidPathError: no layers, or a layer the model does not have.
        InvalidPositionsError: bad ``positions``.
        LogitsNotKeptError: the metric read a position whose logits were not kept.
    """
    check_gradient_mode(model, gates=True)
    layers = check_indices(layers, model.cfg.n_layers, "layers")
    if not layers:
        raise InvalidPathError("layers is empty: name at least one layer whose gates are differentiated.")
    index = kept_positions(positions, tokens.shape[-1], tokens.device)
    gate_hooks = GateHooks(model, layers)
    checkpointing = checkpoint_blocks(model, offload=offload) if checkpoint else contextlib.nullcontext()
    with checkpointing, model.hooks(fwd_hooks=gate_hooks.hooks()), torch.enable_grad():
        value = call_metric(metric, model(tokens, use_cache=False, **logits_kwargs(index)), index)
        gradients = torch.autograd.grad(value, gate_hooks.gate_list(), allow_unused=True)
    return BlockAttribution(
        block_indices=gate_hooks.index_list(),
        gradient=[
            torch.zeros_like(gate) if grad is None else grad * (indices >= 0)
            for gate, grad, indices in zip(gate_hooks.gate_list(), gradients, gate_hooks.index_list())
        ],
        metric=float(value.detach()),
        layers=list(gate_hooks.layers),
    )


@dataclass(frozen=True)
class Suppression:
    """Effect of suppressing a span: KL(base || suppressed) of the next token at each measured position.

    ``positions`` are the measured positions (default: every position from the span's end on),
    ``kl[:, i]`` the KL at ``positions[i]``; ``first_position`` is the first of them.
    """

    kl: Float[Tensor, "batch n_positions"]
    first_position: int
    blocks_removed: int
    positions: Int[Tensor, "n_positions"] | None = None

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if self.kl.numel() else 0.0


def suppress_span(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "batch pos"],
    span: tuple[int, int],
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    *,
    positions: Sequence[int] | Tensor | None = None,
    chunk_tokens: int = 4096,
) -> Suppression:
    """Remove the key blocks overlapping ``span = [start, end)`` from every kept set (chosen layers and
    heads, default all) and measure the KL change of the next-token distribution.

    Args:
        tokens: Token ids ``[batch, pos]``.
        span: ``[start, end)`` token range; every key block holding one of its tokens is removed.
        layers, heads: Where to suppress (default every layer, every query head).
        positions: Positions whose predictions are compared (default every position from ``end``
            on; positions before the span's first key block are unchanged by construction).
        chunk_tokens: Positions unembedded at a time. Memory: the two runs' final hidden states
            (``2 x batch x n_positions x d_model``) plus ``chunk_tokens x d_vocab`` logits, never
            the full ``[batch, T, d_vocab]`` logits.

    Raises:
        InvalidSpanError: an empty span or one outside the sequence; a span in the first key block
            (its queries would have nothing left to attend to); with default ``positions``, a span
            reaching the last token (no position after it to measure).
        InvalidPathError: a layer or head the model does not have.
        InvalidPositionsError: bad ``positions``. ValueError: not ``mode='sparse'``.
    """
    if model.stream.mode != "sparse":
        raise ValueError("suppress_span needs mode='sparse' (the model must run on the edited pattern).")
    seq_len = tokens.shape[-1]
    ((start, end),) = check_spans([span], seq_len)
    if start < model.stream.key_block:
        raise InvalidSpanError(
            f"span {(start, end)} overlaps the first key block (tokens 0..{model.stream.key_block - 1}): suppressing "
            "it leaves the queries of that block nothing to attend to. Start the span after the first key block.")
    if positions is None:
        if end == seq_len:
            raise InvalidSpanError(f"span {(start, end)} reaches the last of the {seq_len} tokens: no position after "
                                   "the span remains to measure. End it earlier or pass positions=.")
        index = torch.arange(end, seq_len, device=tokens.device)
    else:
        index = kept_positions(positions, seq_len, tokens.device)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    layers = check_indices(layers, model.cfg.n_layers, "layers")
    heads = None if heads is None else check_indices(heads, model.cfg.n_heads, "heads")
    key_block = model.stream.key_block
    overlapping = blocks_overlapping((start, end), key_block)
    span_blocks = torch.arange(overlapping.start, overlapping.stop)
    removed = [0]

    def suppress(pattern: BlockSparsePattern, hook) -> BlockSparsePattern:
        hit = torch.isin(pattern.block_indices, span_blocks.to(pattern.device))
        if heads is not None:
            chosen = torch.zeros(pattern.block_indices.shape[1], dtype=torch.bool, device=pattern.device)
            chosen[list(heads)] = True
            hit &= chosen[None, :, None, None]
        removed[0] += int(hit.sum())
        return pattern.with_block_indices(sort_block_row(pattern.block_indices.masked_fill(hit, -1)))

    def final_states(fwd_hooks: list) -> Float[Tensor, "batch n_positions d_model"]:
        kept: list[Tensor] = []

        def keep(value: Tensor, hook) -> Tensor:
            kept.append(value[:, index])
            return value

        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks + [("ln_final.hook_out", keep)], logits_to_keep=1)
        return kept[0]

    with torch.no_grad():
        base = final_states([])
        suppressed = final_states([(f"blocks.{layer}.attn.hook_pattern", suppress) for layer in layers])
        kl = torch.cat([
            _next_token_kl(model.unembed(base_part), model.unembed(suppressed_part))
            for base_part, suppressed_part in zip(base.split(chunk_tokens, dim=1), suppressed.split(chunk_tokens, dim=1))
        ], dim=1) if index.numel() else base.new_zeros(tokens.shape[0], 0)
    first = int(index[0]) if index.numel() else end
    return Suppression(kl=kl, first_position=first, blocks_removed=removed[0], positions=index.cpu())


def _next_token_kl(base: Tensor, suppressed: Tensor) -> Float[Tensor, "batch pos"]:
    """KL(base || suppressed) of the next-token distributions, from logits ``[batch, pos, d_vocab]``."""
    base_logp = base.float().log_softmax(-1)
    suppressed_logp = suppressed.float().log_softmax(-1)
    return (base_logp.exp() * (base_logp - suppressed_logp)).sum(-1)
