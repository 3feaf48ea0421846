"""The real default model: loading, dense equivalence at full top_k, and sane output."""

import copy

import pytest
import torch
from transformer_lens.model_bridge.sources import build_bridge_from_module

import sparse_lens as sl
from sparse_lens.tl.loading import load_hf_model, resolve_model_source


@pytest.fixture(scope="module")
def sparse_and_dense_smollm2():
    hf_model, tokenizer = load_hf_model(resolve_model_source(sl.DEFAULT_MODEL))
    sparse = sl.HookedSparseTransformer.from_hf_model(copy.deepcopy(hf_model), tokenizer,
                                                      sl.StreamConfig(query_block=32, key_block=32, top_k=32))
    dense = build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=hf_model.config, tokenizer=tokenizer)
    return sparse, dense


def test_default_model_matches_the_dense_bridge_at_full_top_k(sparse_and_dense_smollm2):
    sparse, dense = sparse_and_dense_smollm2
    tokens = torch.randint(100, 40000, (1, 300), generator=torch.Generator().manual_seed(0))
    names = lambda name: name in ("blocks.5.attn.hook_pattern", "blocks.5.attn.hook_z")  # noqa: E731
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens, names_filter=names)
        dense_logits, dense_cache = dense.run_with_cache(tokens, names_filter=names)
    assert (logits - dense_logits).abs().max() <= 1e-3  # 30 layers of fp32 on logits of size ~20
    assert (cache["blocks.5.attn.hook_z"] - dense_cache["blocks.5.attn.hook_z"]).abs().max() <= 1e-4
    assert (cache["blocks.5.attn.hook_pattern"].token_probs() - dense_cache["blocks.5.attn.hook_pattern"]).abs().max() <= 1e-5


def test_default_model_knows_a_fact(smollm2):
    text = smollm2.generate("The capital of France is", max_new_tokens=4)
    assert "Paris" in text


def test_default_model_satisfies_the_transformer_lens_protocol(smollm2):
    from transformer_lens.model_protocol import TransformerLensModel

    assert isinstance(smollm2, TransformerLensModel)
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_heads == 9
