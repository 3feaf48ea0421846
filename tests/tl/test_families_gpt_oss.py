"""gpt-oss (learned attention sinks, sliding-window layers, MoE), as a tiny random config built offline.

Each attention head has a learned sink logit that joins the softmax normaliser only (its mass is
dropped); TransformerLens bridges the attention with ``PositionEmbeddingsAttentionBridge``, so
``SparseAttentionBridge`` runs it and passes the HF module's ``sinks`` to every kernel call. With
every causal block kept, the logits equal the HF model's and the hooks equal TransformerLens' dense
bridge; a pruned run differs, and its pattern carries the sinks.
"""

import contextlib
import copy
import inspect

import pytest
import torch
import transformers
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformers import AutoModelForCausalLM

import sparse_lens as sl

NOTHING_PRUNED = sl.TracingConfig(query_block=16, key_block=16, top_k=8, sink_blocks=1, local_blocks=1)
SEQ = 64


def _config(sliding_window: int) -> transformers.GptOssConfig:
    """2 layers (layer 0 sliding-window, layer 1 global), 4 query heads sharing 2 KV heads, 4 experts."""
    return transformers.GptOssConfig(
        vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=sliding_window, max_position_embeddings=4096,
    )


# a window as long as the input (hides nothing), and one that binds (32 of 64 tokens)
WINDOWS = {"window-64": SEQ, "window-32": SEQ // 2}


def _random_hf(config, seed: int = 0):
    """A random HF model whose sinks are far from zero (HF may initialise them to zeros, where a
    dropped or doubled sink would still move the output, but little) and norms perturbed."""
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("sinks"):
                param.copy_(2.0 * torch.randn_like(param))
            elif "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return hf_model


def _sparse(window: int, stream: sl.TracingConfig = NOTHING_PRUNED):
    hf_model = _random_hf(_config(window))
    reference = copy.deepcopy(hf_model)
    return sl.HookedSparseTransformer.from_hf_model(hf_model, None, stream), reference


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 101, (2, seq), generator=torch.Generator().manual_seed(seq))


@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_logits_equal_the_hf_model_when_nothing_is_pruned(window):
    model, reference = _sparse(window)
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        expected = reference(tokens).logits
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.pruned_fraction() == 0.0
    assert torch.equal(pattern.sinks, reference.model.layers[1].self_attn.sinks.detach())
    assert (logits - expected).abs().max() <= 1e-4


def test_hooks_equal_the_dense_bridge():
    model, dense_hf = _sparse(SEQ // 2)
    dense = build_bridge_from_module(dense_hf, dense_hf.config.architectures[0], hf_config=dense_hf.config)
    tokens = _tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, dense_cache = dense.run_with_cache(tokens)
    hooks = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z",
             "hook_resid_pre", "hook_resid_mid", "hook_resid_post"]
    for layer in range(2):
        for hook in hooks:
            name = f"blocks.{layer}.{hook}"
            assert cache[name].shape == dense_cache[name].shape, name
            assert (cache[name] - dense_cache[name]).abs().max() <= 1e-5, name


def test_the_sinks_matter_and_a_pruned_run_differs():
    """Zeroing the sinks moves the logits (so the equality above tests them), and top_k 3 of 8
    key blocks at 128 tokens runs, differs from HF and keeps the pattern's documented shapes."""
    hf_model = _random_hf(_config(4096))
    no_sinks = copy.deepcopy(hf_model)
    with torch.no_grad():
        for layer in no_sinks.model.layers:
            layer.self_attn.sinks.zero_()
        assert (hf_model(_tokens()).logits - no_sinks(_tokens()).logits).abs().max() > 1e-2

    pruned = sl.TracingConfig(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1)
    model, reference = _sparse(4096, pruned)
    tokens = _tokens(128)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        expected = reference(tokens).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() > 1e-3
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.block_indices.shape == pattern.block_mass.shape == (2, 4, 8, 3)
    assert 0.0 < pattern.pruned_fraction() < 1.0
    # the sink takes its share: kept mass plus sink mass is at most 1 per query
    assert (pattern.block_mass.sum(-1) <= 1.0 + 1e-5).all()


@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_kv_cached_decode_equals_the_hf_model(window):
    from transformers import DynamicCache

    model, reference = _sparse(window)
    tokens = _tokens(SEQ)[:1]
    bridged = model.original_model
    cache_kwarg = "cache" if "cache" in inspect.signature(bridged.forward).parameters else "past_key_values"
    cache = DynamicCache(config=bridged.config)
    n_prompt = SEQ - 4
    with torch.no_grad():
        expected = reference(tokens).logits
        steps = [bridged(input_ids=tokens[:, :n_prompt], use_cache=True, **{cache_kwarg: cache}).logits[:, -1]]
        for position in range(n_prompt, SEQ):
            step = bridged(input_ids=tokens[:, position:position + 1], use_cache=True, **{cache_kwarg: cache})
            steps.append(step.logits[:, -1])
    assert (torch.stack(steps, dim=1) - expected[:, n_prompt - 1:]).abs().max() <= 1e-4


def test_gpt_oss_is_supported():
    assert "GptOssForCausalLM" in sl.SUPPORTED_ARCHITECTURES


def test_lean_backward_gives_the_plain_gradients():
    """Segments of the lean backward are cut where the layer type changes (sliding / global), so each
    block gets its own attention mask and position embeddings."""
    model, _ = _sparse(SEQ // 2)
    embedding = model.original_model.get_input_embeddings().weight
    tokens = _tokens(128)[:1]
    gradients = []
    for lean in (False, True):
        embedding.grad = None
        with model.lean_backward() if lean else contextlib.nullcontext():
            model(tokens)[0, -1].logsumexp(-1).backward()
        gradients.append(embedding.grad.clone())
    assert (gradients[0] - gradients[1]).abs().max() <= 1e-6
