"""Path patching (Wang et al. 2022) on any TransformerLens model, sparse or dense: it touches only
head outputs (``hook_z``) and head inputs (``hook_q/k/v``), never a pattern.

Effect of the path *sender heads -> receiver heads' query/key/value input*:
1. run the corrupted input and keep the senders' outputs;
2. run the clean input with the senders' outputs set to the corrupted ones and every other head's
   output frozen at its clean value (MLPs recompute), and record the receivers' inputs;
3. run the clean input with only the receivers' inputs replaced by those recorded values, and
   return ``metric(logits)``.
With GQA the key/value inputs belong to key-value heads: name receivers by their kv head for
``"k"`` and ``"v"``. On the sparse model, a receiver whose query or key input changes also
re-estimates which blocks it keeps: the path is measured on the sparse model as it would run.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

Head = tuple[int, int]  # (layer, head)


def path_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    senders: Sequence[Head],
    receivers: Sequence[Head],
    metric: Callable[[Tensor], Tensor],
    receiver_input: Literal["q", "k", "v"] = "q",
) -> float:
    """``metric`` after patching the path from ``senders`` to ``receivers``' ``receiver_input``."""
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}.")
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

        input_names = {layer: f"blocks.{layer}.attn.hook_{receiver_input}" for layer, _ in receivers}
        recorded: dict[int, Tensor] = {}

        def record(value: Tensor, hook) -> Tensor:
            recorded[hook.layer()] = value.clone()
            return value

        model.run_with_hooks(
            clean_tokens,
            fwd_hooks=[(name, freeze_heads) for name in z_names] + [(name, record) for name in set(input_names.values())],
        )

        def patch_receivers(value: Tensor, hook) -> Tensor:  # value: [batch, pos, head, d_head]
            layer = hook.layer()
            patched = value.clone()
            for receiver_layer, head in receivers:
                if receiver_layer == layer:
                    patched[:, :, head] = recorded[layer][:, :, head]
            return patched

        logits = model.run_with_hooks(clean_tokens, fwd_hooks=[(name, patch_receivers) for name in set(input_names.values())])
        return float(metric(logits))
