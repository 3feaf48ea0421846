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
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.analysis.attribution_patching import GateHooks, call_metric, check_gradient_mode
from sparse_lens.analysis.positions import kept_positions, logits_kwargs
from sparse_lens.kernels.blocks import sort_block_row
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.checkpointing import checkpoint_blocks
from sparse_lens.tl.model import HookedSparseTransformer


@dataclass(frozen=True)
class BlockAttribution:
    """Per layer: the kept blocks and ``d metric / d gate`` for each of them (0 on unused slots)."""

    block_indices: list[Int[Tensor, "batch head n_query_blocks top_k"]]
    gradient: list[Float[Tensor, "batch head n_query_blocks top_k"]]
    metric: float

    def top_blocks(self, n: int = 10) -> list[tuple[int, int, int, int, float]]:
        """The ``n`` blocks with the largest |attribution|: (layer, head, query block, key block, value), batch 0."""
        entries = []
        for layer, (indices, gradient) in enumerate(zip(self.block_indices, self.gradient)):
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
        InvalidPositionsError: bad ``positions``. LogitsNotKeptError: the metric read a position
        whose logits were not kept.
    """
    check_gradient_mode(model, gates=True)
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
    )


@dataclass(frozen=True)
class Suppression:
    """Effect of suppressing a span: KL(base || suppressed) of the next token at each position after it."""

    kl: Float[Tensor, "batch pos"]
    first_position: int
    blocks_removed: int

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if self.kl.numel() else 0.0


def suppress_span(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "batch pos"],
    span: tuple[int, int],
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
) -> Suppression:
    """Remove the key blocks overlapping ``span = [start, end)`` from every kept set (chosen layers and
    heads, default all) and measure the KL change of the next-token distribution after the span."""
    if model.stream.mode != "sparse":
        raise ValueError("suppress_span needs mode='sparse' (the model must run on the edited pattern).")
    start, end = span
    if not 0 <= start < end <= tokens.shape[-1]:
        raise ValueError(f"span {span} is not a non-empty range inside the {tokens.shape[-1]} tokens.")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    key_block = model.stream.key_block
    span_blocks = torch.arange(start // key_block, (end - 1) // key_block + 1)
    removed = [0]

    def suppress(pattern: BlockSparsePattern, hook) -> BlockSparsePattern:
        hit = torch.isin(pattern.block_indices, span_blocks.to(pattern.device))
        if heads is not None:
            chosen = torch.zeros(pattern.block_indices.shape[1], dtype=torch.bool, device=pattern.device)
            chosen[list(heads)] = True
            hit &= chosen[None, :, None, None]
        removed[0] += int(hit.sum())
        return pattern.with_block_indices(sort_block_row(pattern.block_indices.masked_fill(hit, -1)))

    with torch.no_grad():
        base = model(tokens)
        suppressed = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", suppress) for layer in layers])
    base_logp = base[:, end:].float().log_softmax(-1)
    suppressed_logp = suppressed[:, end:].float().log_softmax(-1)
    kl = (base_logp.exp() * (base_logp - suppressed_logp)).sum(-1)
    return Suppression(kl=kl, first_position=end, blocks_removed=removed[0])
