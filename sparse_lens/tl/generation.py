"""Greedy decoding with Hugging Face's KV cache, through the bridged modules (so hooks fire).

TransformerBridge.generate's own KV-cache path gave wrong text in TL 4.3.0, and its cache-free
path re-runs the whole prompt per token; this loop prefills once and then feeds one token at a
time with ``past_key_values``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm


def greedy_generate(
    hf_model: Any,
    tokens: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    verbose: bool = False,
    stop: Callable[[Tensor], bool] | None = None,
    logits_processor: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Int[Tensor, "batch pos_plus_new"]:
    """Append up to ``max_new_tokens`` greedy tokens; stop early once every row produced EOS, or
    once ``stop(output)`` (called with the tokens so far after each step) returns True.

    ``logits_processor``: ``(tokens so far [batch, pos], next-token scores [batch, vocab]) ->
    scores``, applied before the argmax as Hugging Face's ``generate`` applies its
    ``LogitsProcessorList`` (scores upcast to float32 first, as there); e.g.
    ``LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.1)])``. Decoding stays greedy.

    Every forward asks for the last position's logits only (``logits_to_keep=1``, where the model's
    forward takes it): the prefill's full logits would be [batch, pos, d_vocab] (32 GiB in float32
    for 32k tokens of a 262k vocabulary) where one row is read."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
    parameters = inspect.signature(hf_model.forward).parameters
    cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
    forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    output = tokens
    step_input = tokens
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in tqdm(range(max_new_tokens), desc="generate", disable=not verbose):
        logits = hf_model(input_ids=step_input, use_cache=True, **{cache_kwarg: cache}, **forward_kwargs).logits
        scores = logits[:, -1]
        if logits_processor is not None:
            scores = logits_processor(output, scores.to(dtype=torch.float32, copy=True))
        next_token = scores.argmax(-1)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        output = torch.cat([output, next_token[:, None]], dim=1)
        if bool(finished.all()) or (stop is not None and stop(output)):
            break
        step_input = next_token[:, None]
    return output
