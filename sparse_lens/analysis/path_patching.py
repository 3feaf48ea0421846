"""Path patching (Wang et al. 2022) on any TransformerLens model, sparse or dense: it touches only
head outputs (``hook_z``) and head inputs (``hook_q/k/v``), never a pattern.

Effect of the path *sender heads -> receiver heads' query/key/value input*:
1. run the corrupted input and keep the senders' outputs;
2. run the clean input with the senders' outputs set to the corrupted ones and every other head's
   output frozen at its clean value (MLPs recompute), and record the receivers' inputs;
3. run the clean input with only the receivers' inputs replaced by those recorded values, and
   return ``metric(logits)``.

Two implementations of the same definition:

- :func:`path_patch` (use this one): memory O(T x d_model) per layer alive at once. Step 1 runs
  the corrupted input only up to the last sender's layer and keeps the senders' ``hook_z`` alone
  (``[batch, T, n_senders, d_head]``); step 2 runs clean and patched rows side by side, a batch of
  two, up to the last receiver's layer: at every ``hook_z`` the patched row takes the clean row's
  head outputs (the freezing) and the senders' corrupted ones, so no layer is cached over the
  whole sequence; step 3 is one forward, with logits at ``positions`` only. Cost: about three
  forwards (less when senders and receivers are early), peak memory that of a batch-of-two forward.
- :func:`path_patch_cached`: the direct form, caching ``hook_z`` of every layer for the clean and
  the corrupted input (``2 x n_layers x T x d_model``: 102 GB at 128k tokens on Qwen2.5-1.5B).
  Kept as the test oracle and for short inputs.

With GQA the key/value inputs belong to key-value heads: name receivers by their kv head for
``"k"`` and ``"v"`` (query head ``h`` reads kv head ``h // (n_heads // n_key_value_heads)``). On the
sparse model every row of a batch estimates its own blocks, so the patched row of step 2 keeps
the blocks its own queries and keys select, and a receiver whose query or key input changes
re-estimates its blocks in step 3: the path is measured on the sparse model as it would run.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.analysis.positions import call_metric, kept_positions, logits_kwargs
from sparse_lens.errors import InvalidPathError, ShapeError

Head = tuple[int, int]  # (layer, head); for "k" / "v" receivers the head is a key-value head
ReceiverInput = Literal["q", "k", "v"]


def path_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    senders: Sequence[Head],
    receivers: Sequence[Head],
    metric: Callable[[Tensor], Tensor],
    receiver_input: ReceiverInput = "q",
    *,
    positions: Sequence[int] | Tensor | None = None,
) -> float:
    """``metric`` after patching the path from ``senders`` to ``receivers``' ``receiver_input``.

    Args:
        model: A TransformerLens bridge (``HookedSparseTransformer`` or a dense ``TransformerBridge``).
        clean_tokens, corrupted_tokens: Token ids of the same shape.
        senders: ``(layer, head)`` query heads whose corrupted outputs are sent; each must sit in a
            layer before every receiver's layer. Empty: nothing is sent (the clean metric).
        receivers: ``(layer, head)`` heads whose ``receiver_input`` is patched (kv heads for k/v).
        metric: Logits -> scalar tensor. It receives ``[batch, pos, d_vocab]`` logits, or
            ``[batch, len(positions), d_vocab]`` (the kept positions, in order) with ``positions``.
        receiver_input: ``"q"``, ``"k"`` or ``"v"``.
        positions: Positions whose logits the metric reads (``None``: all; keep few at long T).

    Returns:
        ``float(metric(logits))`` of the path-patched run.

    Raises:
        InvalidPathError: bad heads, layers or ``receiver_input``, or a sender that cannot reach
            the receivers. InvalidPositionsError: bad ``positions``. ShapeError: token shapes differ.
        LogitsNotKeptError: the metric read a position whose logits were not kept.
    """
    sender_z, receiver_heads, index = _validate(model, clean_tokens, corrupted_tokens, senders, receivers,
                                                receiver_input, positions)
    batch = clean_tokens.shape[0]
    input_name = f"attn.hook_{receiver_input}"
    with torch.no_grad():
        # Step 1: the senders' corrupted outputs only, up to the last sender's layer.
        corrupted: dict[int, Tensor] = {}

        def keep_senders(z: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
            corrupted[hook.layer()] = z[:, :, sender_z[hook.layer()]].clone()
            return z

        if sender_z:
            model.run_with_hooks(corrupted_tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", keep_senders)
                                                              for layer in sender_z],
                                 stop_at_layer=max(sender_z) + 1)

        # Step 2: rows [clean, patched] side by side; the patched row's heads are frozen at the
        # clean row's outputs except the senders. Stops after the last receiver's layer.
        def freeze(z: Float[Tensor, "batch2 pos head d_head"], hook) -> Tensor:
            clean_z, patched_z = z[:batch], z[batch:]
            patched_z.copy_(clean_z)  # in place: no gradient here, and no second [batch, T, ...] copy
            if hook.layer() in corrupted:
                patched_z[:, :, sender_z[hook.layer()]] = corrupted[hook.layer()]
            return z

        recorded: dict[int, Tensor] = {}

        def record(value: Float[Tensor, "batch2 pos head d_head"], hook) -> Tensor:
            recorded[hook.layer()] = value[batch:, :, receiver_heads[hook.layer()]].clone()
            return value

        last_receiver_layer = max(receiver_heads)
        model.run_with_hooks(
            torch.cat([clean_tokens, clean_tokens]),
            fwd_hooks=[(f"blocks.{layer}.attn.hook_z", freeze) for layer in range(last_receiver_layer)]
            + [(f"blocks.{layer}.{input_name}", record) for layer in receiver_heads],
            stop_at_layer=last_receiver_layer + 1,
        )

        # Step 3: the clean run with the receivers' inputs replaced.
        def patch_receivers(value: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
            value[:, :, receiver_heads[hook.layer()]] = recorded[hook.layer()]
            return value

        logits = model.run_with_hooks(clean_tokens, fwd_hooks=[(f"blocks.{layer}.{input_name}", patch_receivers)
                                                              for layer in receiver_heads], **logits_kwargs(index))
        return float(call_metric(metric, logits, index))


def path_patch_cached(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    senders: Sequence[Head],
    receivers: Sequence[Head],
    metric: Callable[[Tensor], Tensor],
    receiver_input: ReceiverInput = "q",
    *,
    positions: Sequence[int] | Tensor | None = None,
) -> float:
    """:func:`path_patch` by its direct definition, caching ``hook_z`` of every layer for both inputs
    (memory ``2 x n_layers x T x d_model``): the oracle for :func:`path_patch`, for short inputs.
    Same arguments, result and errors."""
    _, receiver_heads, index = _validate(model, clean_tokens, corrupted_tokens, senders, receivers,
                                         receiver_input, positions)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=lambda name: name in z_names)
        _, corrupted = model.run_with_cache(corrupted_tokens, names_filter=lambda name: name in z_names)
        sender_set = set(senders)

        def freeze_heads(z: Tensor, hook) -> Tensor:  # z: [batch, pos, head, d_head]
            name = f"blocks.{hook.layer()}.attn.hook_z"  # hook.name is the canonical (o.hook_in) name
            patched = clean[name].clone()
            for head in range(z.shape[2]):
                if (hook.layer(), head) in sender_set:
                    patched[:, :, head] = corrupted[name][:, :, head]
            return patched

        input_names = {layer: f"blocks.{layer}.attn.hook_{receiver_input}" for layer in receiver_heads}
        recorded: dict[int, Tensor] = {}

        def record(value: Tensor, hook) -> Tensor:
            recorded[hook.layer()] = value.clone()
            return value

        model.run_with_hooks(
            clean_tokens,
            fwd_hooks=[(name, freeze_heads) for name in z_names] + [(name, record) for name in input_names.values()],
        )

        def patch_receivers(value: Tensor, hook) -> Tensor:  # value: [batch, pos, head, d_head]
            layer = hook.layer()
            patched = value.clone()
            for head in receiver_heads[layer]:
                patched[:, :, head] = recorded[layer][:, :, head]
            return patched

        logits = model.run_with_hooks(clean_tokens, fwd_hooks=[(name, patch_receivers) for name in input_names.values()],
                                      **logits_kwargs(index))
        return float(call_metric(metric, logits, index))


def _validate(
    model: Any,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    senders: Sequence[Head],
    receivers: Sequence[Head],
    receiver_input: str,
    positions: Sequence[int] | Tensor | None,
) -> tuple[dict[int, list[int]], dict[int, list[int]], Tensor | None]:
    """Check the request once; return senders and receivers as ``{layer: [heads]}`` (sorted) and
    the kept logit positions."""
    if receiver_input not in ("q", "k", "v"):
        raise InvalidPathError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}.")
    if clean_tokens.ndim != 2 or clean_tokens.shape != corrupted_tokens.shape:
        raise ShapeError(
            f"clean and corrupted tokens must both be [batch, pos] of one shape, got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}."
        )
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_kv_heads = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    receiver_count = n_heads if receiver_input == "q" else n_kv_heads
    sender_heads = _by_layer(senders, n_layers, n_heads, "sender", "query heads")
    receiver_heads = _by_layer(receivers, n_layers, receiver_count, f"{receiver_input} receiver",
                               "query heads" if receiver_input == "q" else
                               f"key-value heads (query head h reads kv head h // {n_heads // n_kv_heads})")
    if not receiver_heads:
        raise InvalidPathError("receivers is empty: name at least one (layer, head) to patch.")
    late = [(layer, head) for layer, heads in sender_heads.items() for head in heads if layer >= min(receiver_heads)]
    if late:
        raise InvalidPathError(
            f"senders {late} sit at or after the first receiver layer {min(receiver_heads)}: a head's output "
            "reaches only later layers' inputs. Every sender must come before every receiver."
        )
    return sender_heads, receiver_heads, kept_positions(positions, clean_tokens.shape[1], clean_tokens.device)


def _by_layer(heads: Sequence[Head], n_layers: int, n_heads: int, role: str, what: str) -> dict[int, list[int]]:
    by_layer: dict[int, set[int]] = {}
    for entry in heads:
        try:
            layer, head = (int(value) for value in entry)
        except (TypeError, ValueError):
            raise InvalidPathError(f"a {role} must be a (layer, head) pair of ints, got {entry!r}.") from None
        if not 0 <= layer < n_layers or not 0 <= head < n_heads:
            raise InvalidPathError(
                f"{role} {(layer, head)} does not exist: layers are 0..{n_layers - 1}, {what} 0..{n_heads - 1}."
            )
        by_layer.setdefault(layer, set()).add(head)
    return {layer: sorted(by_layer[layer]) for layer in sorted(by_layer)}
