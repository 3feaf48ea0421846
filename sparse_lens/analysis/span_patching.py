"""Span patching: the long-context form of per-position activation patching.

TransformerLens' ``get_act_patch_resid_pre`` and friends patch one position per forward: at 128k
tokens that is 128k forwards per layer. Here the unit is a *span* of tokens (a sentence, a key
block, any ``[start, end)`` range): for each span and each chosen layer (or head), one forward
runs with the activation over that span replaced, and the metric is reported per span.

- ``ablation="patch"`` (TransformerLens' convention, denoising): run ``corrupted_tokens`` and
  write the *clean* activation into the span;
- ``ablation="zero"``: run ``clean_tokens`` with the span's activation set to 0;
- ``ablation="mean"``: run ``clean_tokens`` with the span's activation set to its mean over all
  positions of the clean run (per batch row and feature).

Activations: ``"resid_pre"`` / ``"resid_post"`` (``blocks.{l}.hook_resid_pre`` / ``_post``, result
``[layer, span]``) or ``"z"`` (the heads' outputs ``blocks.{l}.attn.hook_z``, result
``[head, span]`` over the chosen ``(layer, head)`` pairs).

Memory and cost: one layer's clean activation and the residual stream entering that layer in the
run being patched (each ``[batch, T, d_model]``) are alive at a time. Everything before layer
``l`` is the same in every forward that patches layer ``l``, so it runs once: layers are visited in
order; for each, one clean forward that stops after that layer caches the patched hook alone, and
the run's residual stream entering ``l`` is carried forward from the previous visited layer (one
forward in all, over every layer). Every span (and head) of that layer then runs blocks ``l`` to
the last only (:func:`forward_from_layer`; ``l + 1`` on for ``resid_post``, patched as the residual
entering block ``l + 1``), with logits at ``positions`` only: per span
``(n_layers - l) / n_layers`` of a forward plus ``1 / (n_spans x heads)`` of a partial clean
forward; the result is bit-identical to patching in a full forward. On the sparse model each
patched forward re-estimates the blocks of layers ``l`` onwards (the patch changes their queries
and keys from the span on), as the model would run.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from sparse_lens.analysis.positions import call_metric, check_indices, kept_positions, logits_kwargs
from sparse_lens.errors import InvalidConfigError, InvalidPathError, InvalidSpanError, ShapeError
from sparse_lens.kernels.checks import is_int_at_least

Span = tuple[int, int]
Activation = Literal["resid_pre", "resid_post", "z"]
Ablation = Literal["patch", "zero", "mean"]
_HOOKS = {"resid_pre": "blocks.{}.hook_resid_pre", "resid_post": "blocks.{}.hook_resid_post", "z": "blocks.{}.attn.hook_z"}


def block_spans(seq_len: int, block: int) -> list[Span]:
    """``[start, end)`` of every ``block``-token block of a ``seq_len``-token sequence (the last may
    be shorter): the key blocks of a ``TracingConfig`` with ``key_block = block``.
    ``InvalidSpanError`` for a ``block`` that is not an int >= 1 (a bool too) or an empty sequence."""
    if not is_int_at_least(block, 1):
        raise InvalidSpanError(f"spans as an int is a span length in tokens, >= 1; got {block!r}.")
    if seq_len < 1:
        raise InvalidSpanError(f"the sequence is empty (seq_len {seq_len}): no spans to cut.")
    return [(start, min(start + block, seq_len)) for start in range(0, seq_len, block)]


def span_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"] | None,
    metric: Callable[[Tensor], Tensor],
    spans: Iterable[Span],
    *,
    activation: Activation = "resid_pre",
    layers: Sequence[int] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    ablation: Ablation = "patch",
    positions: Sequence[int] | Tensor | None = None,
    progress: bool = True,
) -> Float[Tensor, "unit span"]:
    """The metric after patching (or ablating) one activation over each span, one forward each
    (from the patched layer on: module docstring).

    Args:
        model: A TransformerLens bridge (``HookedSparseTransformer`` or a dense ``TransformerBridge``).
        clean_tokens: Token ids ``[batch, pos]``: the source of patched activations, and the run
            that is ablated for ``"zero"`` / ``"mean"``.
        corrupted_tokens: Token ids of the same shape, the run patched for ``"patch"`` (ignored,
            may be ``None``, otherwise).
        metric: Logits -> scalar tensor. It receives ``[batch, pos, d_vocab]``, or
            ``[batch, len(positions), d_vocab]`` (the kept positions, in order) with ``positions``.
        spans: ``[start, end)`` token ranges (e.g. :func:`block_spans`, or a
            :class:`~sparse_lens.analysis.anchors.sentences.Sentences`); they may overlap (each is
            patched in its own forward).
        activation: ``"resid_pre"``, ``"resid_post"`` or ``"z"``.
        layers: Layers for the residual stream (default all); for ``"z"``, the layers whose every
            head is patched when ``heads`` is not given.
        heads: ``"z"`` only: ``(layer, head)`` pairs (default every head of ``layers``, layer-major,
            so the result reshapes to ``[layer, head, span]``).
        ablation: ``"patch"``, ``"zero"`` or ``"mean"`` (module docstring).
        positions: Positions whose logits the metric reads (``None``: all; keep few at long T).
        progress: Show a tqdm progress bar over the forwards.

    Returns:
        float32 ``[layer, span]`` (residual stream) or ``[head, span]`` (``"z"``), on the CPU.

    Raises:
        InvalidSpanError: no spans, an empty span or one outside the sequence.
        InvalidPathError: an unknown layer or head. InvalidPositionsError: bad ``positions``.
        ShapeError: mismatched tokens.
        InvalidConfigError (a ``ValueError``): unknown ``activation`` or ``ablation``.
        LogitsNotKeptError: the metric read a position whose logits were not kept.
    """
    if activation not in _HOOKS:
        raise InvalidConfigError(f"activation must be one of {tuple(_HOOKS)}, got {activation!r}.")
    if ablation not in ("patch", "zero", "mean"):
        raise InvalidConfigError(f"ablation must be 'patch', 'zero' or 'mean', got {ablation!r}.")
    if clean_tokens.ndim != 2:
        raise ShapeError(f"clean_tokens must be [batch, pos], got {tuple(clean_tokens.shape)}.")
    if ablation == "patch" and (corrupted_tokens is None or corrupted_tokens.shape != clean_tokens.shape):
        raise ShapeError("ablation='patch' needs corrupted_tokens of the same [batch, pos] shape as clean_tokens.")
    seq_len = clean_tokens.shape[1]
    span_list = check_spans(spans, seq_len)
    units = _units(model, activation, layers, heads)  # [(layer, head or None)], layer-major
    index = kept_positions(positions, seq_len, clean_tokens.device)
    run_tokens = corrupted_tokens if ablation == "patch" else clean_tokens
    results = torch.zeros(len(units), len(span_list))
    bar = tqdm(total=len(units) * len(span_list), desc=f"span patching ({activation}, {ablation})", disable=not progress)
    with torch.no_grad():
        layers = sorted({layer for layer, _ in units})
        entries = [_entry(activation, layer, int(model.cfg.n_layers)) for layer in layers]
        residuals = _residuals_entering(model, run_tokens, [first_block for first_block, _ in entries])
        for layer, (first_block, entry_hook), residual in zip(layers, entries, residuals):
            name = _HOOKS[activation].format(layer)
            layer_heads = [(row, head) for row, (unit_layer, head) in enumerate(units) if unit_layer == layer]
            source = None if ablation == "zero" else _clean_activation(model, clean_tokens, name, layer, ablation)
            for row, head in layer_heads:
                for column, (start, end) in enumerate(span_list):
                    hook = _span_hook(source, head, start, end)
                    logits = forward_from_layer(model, residual, first_block, fwd_hooks=[(entry_hook, hook)],
                                                **logits_kwargs(index))
                    results[row, column] = float(call_metric(metric, logits, index))
                    bar.update()
            del source
    bar.close()
    return results


def check_spans(spans: Iterable[Span], seq_len: int) -> list[Span]:
    """``spans`` as a list of ``(start, end)`` ints with ``0 <= start < end <= seq_len``.

    Raises:
        InvalidSpanError: no spans, a malformed, empty or out-of-range span.
    """
    checked = []
    for span in spans:
        try:  # operator.index: a float (0.5) or a bool is no token position, int() would truncate it
            start, end = (operator.index(value) for value in span)
            if any(isinstance(value, bool) for value in span):
                raise TypeError
        except (TypeError, ValueError):
            raise InvalidSpanError(f"a span must be a (start, end) pair of ints, got {span!r}.") from None
        if start >= end:
            raise InvalidSpanError(f"span {(start, end)} is empty: spans are [start, end) with start < end.")
        if start < 0 or end > seq_len:
            raise InvalidSpanError(f"span {(start, end)} reaches outside the {seq_len} tokens [0, {seq_len}).")
        checked.append((start, end))
    if not checked:
        raise InvalidSpanError("no spans given: pass at least one [start, end) token range.")
    return checked


def _units(model: Any, activation: str, layers: Sequence[int] | None, heads: Sequence[tuple[int, int]] | None):
    """The rows of the result: ``(layer, None)`` for the residual stream, ``(layer, head)`` for z."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    chosen = check_indices(layers, n_layers, "layers")
    if not chosen:
        raise InvalidPathError(f"layers is empty: name at least one layer in 0..{n_layers - 1}.")
    if activation != "z":
        if heads is not None:
            raise InvalidConfigError("heads= applies to activation='z' only.")
        return [(layer, None) for layer in chosen]
    try:
        pairs = [(layer, head) for layer in chosen for head in range(n_heads)] if heads is None else \
            [(operator.index(layer), operator.index(head)) for layer, head in heads]
    except (TypeError, ValueError):
        raise InvalidPathError(f"heads must be (layer, head) pairs of ints, got {heads!r}.") from None
    bad = [pair for pair in pairs if not (0 <= pair[0] < n_layers and 0 <= pair[1] < n_heads)]
    if bad or not pairs:
        raise InvalidPathError(f"heads {bad or pairs} must be (layer, head) pairs with layers 0..{n_layers - 1} "
                               f"and heads 0..{n_heads - 1}.")
    return pairs


def forward_from_layer(
    model: Any, residual: Float[Tensor, "batch pos d_model"], layer: int, **kwargs: Any
) -> Any:
    """``model.run_with_hooks(residual, start_at_layer=layer, **kwargs)`` (``fwd_hooks``,
    ``stop_at_layer``, ``logits_to_keep``, ...) running blocks ``layer`` onwards only.

    ``residual`` is the residual stream entering block ``layer`` (``blocks.{layer}.hook_resid_pre``
    of some run). TransformerLens' ``start_at_layer`` still runs blocks ``0 .. layer - 1`` (on
    ``residual`` as input embeddings) and discards their output; here those blocks pass their
    input through instead while the call runs, so the cost is that of the later blocks alone. The
    result is bit-identical to the full forward whose residual entering ``layer`` is ``residual``
    (same blocks, same inputs; tests/analysis/test_span_patching.py).

    Raises:
        InvalidPathError: ``layer`` not an int in ``[0, n_layers)``, or a ``stop_at_layer`` not after it.
        ShapeError: ``residual`` not ``[batch, pos, d_model]``.
    """
    n_layers = int(model.cfg.n_layers)
    checked = check_indices([layer], n_layers, "layers") if not isinstance(layer, bool) else []
    if checked != [layer]:
        raise InvalidPathError(f"layer must be an int in 0..{n_layers - 1}, got {layer!r}.")
    stop = kwargs.get("stop_at_layer")
    if stop is not None and (stop % n_layers if -n_layers <= stop < 0 else stop) <= layer:
        raise InvalidPathError(f"stop_at_layer={stop} does not come after layer {layer}: no block would run.")
    if residual.ndim != 3 or residual.shape[-1] != model.cfg.d_model:
        raise ShapeError(f"residual must be [batch, pos, d_model={model.cfg.d_model}], got {tuple(residual.shape)}.")
    with _blocks_passing_through(model, layer):
        return model.run_with_hooks(residual, start_at_layer=layer, **kwargs)


@contextlib.contextmanager
def _blocks_passing_through(model: Any, stop: int) -> Iterator[None]:
    """Blocks ``0 .. stop - 1`` return their input unchanged while the context is open (written
    into each block's instance dict, as :mod:`sparse_lens.tl.checkpointing` installs its forwards;
    whatever was there before is put back)."""
    blocks = list(model.blocks)[:stop]
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.__dict__["forward"] = _pass_through
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = forward


def _pass_through(*args: Any, **kwargs: Any) -> Tensor:
    """A block that does nothing: its hidden states, as the model's layer loop passes them."""
    return args[0] if args else kwargs["hidden_states"]


def _entry(activation: str, layer: int, n_layers: int) -> tuple[int, str]:
    """The first block of the forwards patching ``activation`` at ``layer``, and the hook they patch.
    ``resid_post`` of block ``l`` is the residual stream entering block ``l + 1``: patched there,
    block ``l`` (the same in every such forward) is not run again (except after the last block)."""
    if activation == "resid_post" and layer + 1 < n_layers:
        return layer + 1, _HOOKS["resid_pre"].format(layer + 1)
    return layer, _HOOKS[activation].format(layer)


def _residuals_entering(model: Any, tokens: Tensor, blocks: list[int]) -> Iterator[Tensor]:
    """The residual stream entering each of the (ascending) ``blocks`` in the run on ``tokens``: the
    first from a forward that stops there, each next one carried on from the last (one forward over
    all the layers in total); the caller drops each before the next is made."""
    residual, at = None, 0
    for block in blocks:
        if residual is None:
            residual = model(tokens, stop_at_layer=block)
        elif block != at:
            residual = forward_from_layer(model, residual, at, stop_at_layer=block)
        at = block
        yield residual


def _clean_activation(model: Any, tokens: Tensor, name: str, layer: int, ablation: str) -> Tensor:
    """The clean run's activation at hook ``name`` (``"mean"``: its mean over positions), from a
    forward that stops after ``layer``."""
    kept: list[Tensor] = []

    def keep(value: Tensor, hook) -> Tensor:
        kept.append(value.mean(dim=1, keepdim=True) if ablation == "mean" else value.clone())
        return value

    model.run_with_hooks(tokens, fwd_hooks=[(name, keep)], stop_at_layer=layer + 1)
    return kept[0]


def _span_hook(source: Tensor | None, head: int | None, start: int, end: int) -> Callable:
    """A hook writing ``source`` (clean values, or a per-row mean broadcast; ``None``: zeros) into
    positions ``[start, end)`` (of ``head`` only, for ``hook_z``)."""
    where = (slice(None), slice(start, end)) if head is None else (slice(None), slice(start, end), head)

    def hook(value: Tensor, hook) -> Tensor:
        value = value.clone()  # the residual tensor may be shared with the previous block's output
        if source is None:
            value[where] = 0
        elif source.shape[1] == 1:  # a mean over positions
            value[where] = (source[:, :, head] if head is not None else source).to(value.dtype)
        else:
            value[where] = source[where].to(value.dtype)
        return value

    return hook
