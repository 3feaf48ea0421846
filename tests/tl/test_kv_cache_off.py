"""A plain forward builds no KV cache: HF's cache would keep every layer's keys and values alive to
the end of the forward (the largest avoidable memory of a long forward)."""

import torch

import sparse_lens as sl
from tests.conftest import tiny_llama_config


def test_plain_forward_asks_hf_for_no_cache():
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    seen = []
    model.original_model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("use_cache")),
                                                   with_kwargs=True)
    tokens = torch.randint(0, 101, (1, 64))
    model(tokens)
    model.run_with_cache(tokens)
    assert seen == [False, False]
    model.generate(tokens, max_new_tokens=2, stop_at_eos=False)  # decoding still uses its cache
    assert seen[2:] and all(flag is True for flag in seen[2:])
