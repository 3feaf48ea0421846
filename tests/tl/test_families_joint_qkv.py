"""Fused-qkv families (Phi-3, GPT-NeoX / Pythia), each as a tiny random config built offline.

TransformerLens bridges them with ``JointQKVPositionEmbeddingsAttentionBridge``, which sparse_lens
replaces with ``SparseJointQKVAttentionBridge``. Per family: with every causal block kept, the
logits equal the HF model's own forward and the hooks (``hook_q/k/v``, ``hook_z``, the residual
stream) equal TransformerLens' dense bridge; ``hook_rot_q/k`` (which the dense joint bridge does
not fire) equal HF's own RoPE function applied to the dense bridge's ``hook_q/k``; a pruned run
differs from dense, with pattern shapes as documented; KV-cached decode equals HF.
"""

import copy
import inspect
import sys

import pytest
import torch
import transformers
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformers import AutoModelForCausalLM

import sparse_lens as sl
from sparse_lens.tl.joint_qkv_attention import SparseJointQKVAttentionBridge

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=4096)
NOTHING_PRUNED = sl.TracingConfig(query_block=16, key_block=16, top_k=8, sink_blocks=1, local_blocks=1)
SEQ = 64

FAMILIES = {
    # Phi-3: qkv_proj = [q; k; v] stacked, GQA (4 query heads, 2 KV heads), full rotary
    "phi3": lambda: transformers.Phi3Config(**SHAPE, num_key_value_heads=2, pad_token_id=0),
    # Phi-4-mini style partial rotary: 8 of 16 dims (cos is exactly half the head: the case a
    # half-width "full rotary" convention would get wrong)
    "phi3-partial": lambda: transformers.Phi3Config(**SHAPE, num_key_value_heads=2, pad_token_id=0,
                                                    partial_rotary_factor=0.5),
    # Phi-3-mini-128k / Phi-3.5 style LongRoPE: rescaled frequencies past original_max (32 here,
    # so the long factors apply at 64 tokens)
    "phi3-longrope": lambda: transformers.Phi3Config(**SHAPE, num_key_value_heads=2, pad_token_id=0, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 32}),
    # Pythia: query_key_value interleaved per head, rotary_pct 0.25 (4 of 16 dims), q/k/v biases,
    # parallel attention and MLP
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**SHAPE, rotary_pct=0.25),
    # GPT-NeoX with sequential residual (attention, then MLP): hook_resid_mid exists
    "gpt-neox-sequential": lambda: transformers.GPTNeoXConfig(**SHAPE, rotary_pct=0.25, use_parallel_residual=False),
}


def _random_hf(config, seed: int = 0):
    """A random HF model whose norm weights and all biases are perturbed too (HF initialises them
    to ones and zeros, which would hide a mixed-up norm or a wrongly split qkv bias)."""
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    return hf_model


def _sparse(family: str, stream: sl.TracingConfig = NOTHING_PRUNED):
    """(sparse model, untouched copy of its HF model) for ``family``."""
    hf_model = _random_hf(FAMILIES[family]())
    reference = copy.deepcopy(hf_model)
    return sl.HookedSparseTransformer.from_hf_model(hf_model, None, stream), reference


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 101, (2, seq), generator=torch.Generator().manual_seed(seq))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_hf_model_when_nothing_is_pruned(family):
    model, reference = _sparse(family)
    assert all(isinstance(attn, SparseJointQKVAttentionBridge) for attn in model.sparse_attention_layers())
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        expected = reference(tokens).logits
    assert cache["blocks.1.attn.hook_pattern"].pruned_fraction() == 0.0
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_equal_the_dense_bridge(family):
    model, dense_hf = _sparse(family)
    dense = build_bridge_from_module(dense_hf, dense_hf.config.architectures[0], hf_config=dense_hf.config)
    tokens = _tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, dense_cache = dense.run_with_cache(tokens)
    hooks = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_cos", "attn.hook_sin", "attn.hook_z",
             "hook_attn_out", "hook_resid_pre", "hook_resid_post"]
    if family == "gpt-neox-sequential":
        hooks.append("hook_resid_mid")
    # HF's own RoPE for this family, on the dense bridge's q and k ([batch, pos, head, d_head])
    apply_rotary_pos_emb = sys.modules[type(dense_hf).__module__].apply_rotary_pos_emb
    for layer in range(2):
        for hook in hooks:
            name = f"blocks.{layer}.{hook}"
            assert cache[name].shape == dense_cache[name].shape, name
            assert (cache[name] - dense_cache[name]).abs().max() <= 1e-5, name
        prefix = f"blocks.{layer}.attn."
        rot_q, rot_k = apply_rotary_pos_emb(
            dense_cache[prefix + "hook_q"].transpose(1, 2), dense_cache[prefix + "hook_k"].transpose(1, 2),
            dense_cache[prefix + "hook_cos"], dense_cache[prefix + "hook_sin"],
        )
        assert (cache[prefix + "hook_rot_q"] - rot_q.transpose(1, 2)).abs().max() <= 1e-5
        assert (cache[prefix + "hook_rot_k"] - rot_k.transpose(1, 2)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["phi3", "gpt-neox"])
def test_a_pruned_run_differs_and_its_pattern_has_the_documented_shapes(family):
    """top_k 3 of 8 key blocks at 128 tokens: some blocks are pruned, the logits move away from
    the dense model's, and hook_pattern / hook_block_* carry [batch, head, n_query_blocks, top_k]."""
    pruned = sl.TracingConfig(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1)
    model, reference = _sparse(family, pruned)
    tokens = _tokens(128)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        expected = reference(tokens).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() > 1e-3
    n_heads = model.cfg.n_heads
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert isinstance(pattern, sl.BlockSparsePattern)
        assert pattern.block_indices.shape == (2, n_heads, 8, 3)
        assert pattern.block_mass.shape == (2, n_heads, 8, 3)
        assert cache[f"blocks.{layer}.attn.hook_block_indices"].shape == (2, n_heads, 8, 3)
        assert 0.0 < pattern.pruned_fraction() < 1.0
        assert pattern.token_probs().shape == (2, n_heads, 128, 128)
    # observe mode: dense attention (the HF logits), the same selection recorded in layer 0 (whose
    # input does not depend on the mode)
    with torch.no_grad(), model.stream_settings(mode="observe"):
        observed, observe_cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    assert (observed - expected).abs().max() <= 1e-4
    assert torch.equal(observe_cache["blocks.0.attn.hook_pattern"].block_indices,
                       cache["blocks.0.attn.hook_pattern"].block_indices)


@pytest.mark.parametrize("family", ["phi3", "gpt-neox"])
def test_a_hook_z_patch_acts_as_in_the_dense_bridge(family):
    """hook_z is live: zeroing one head there changes the output exactly as in the dense bridge."""
    model, dense_hf = _sparse(family)
    dense = build_bridge_from_module(dense_hf, dense_hf.config.architectures[0], hf_config=dense_hf.config)

    def zero_head_1(z, hook):
        z[:, :, 1] = 0.0
        return z

    tokens = _tokens()
    hooks = [("blocks.0.attn.hook_z", zero_head_1)]
    with torch.no_grad():
        patched = model.run_with_hooks(tokens, fwd_hooks=hooks)
        dense_patched = dense.run_with_hooks(tokens, fwd_hooks=hooks)
        unpatched = dense(tokens)
    assert (patched - unpatched).abs().max() > 1e-3
    assert (patched - dense_patched).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_decode_equals_the_hf_model(family):
    """Sparse prefill (nothing pruned), then one token at a time with HF's KV cache (GPT-NeoX passes
    it as ``layer_past``, Phi-3 as ``cache``): each step's logits equal HF's on the whole sequence."""
    from transformers import DynamicCache

    model, reference = _sparse(family)
    tokens = _tokens(40)[:1]
    bridged = model.original_model
    cache_kwarg = "cache" if "cache" in inspect.signature(bridged.forward).parameters else "past_key_values"
    cache = DynamicCache(config=bridged.config)
    with torch.no_grad():
        expected = reference(tokens).logits
        steps = [bridged(input_ids=tokens[:, :36], use_cache=True, **{cache_kwarg: cache}).logits[:, -1]]
        for position in range(36, 40):
            step = bridged(input_ids=tokens[:, position:position + 1], use_cache=True, **{cache_kwarg: cache})
            steps.append(step.logits[:, -1])
    assert (torch.stack(steps, dim=1) - expected[:, 35:]).abs().max() <= 1e-4


def test_each_family_exercises_its_feature():
    """The configs above carry the features their tests are about, so a bug in one would show."""
    head_dim = 16
    for family, rotary_dim in [("phi3", 16), ("phi3-partial", 8), ("gpt-neox", 4)]:
        model, _ = _sparse(family)
        cos, _ = model.original_model.base_model.rotary_emb(torch.zeros(1), torch.arange(4)[None])
        assert cos.shape[-1] == rotary_dim, family
    phi3, _ = _sparse("phi3")
    attn = phi3.blocks[0].attn
    assert attn.q.original_component.out_features == 4 * head_dim  # GQA: 4 query heads
    assert attn.k.original_component.out_features == 2 * head_dim  # ... read by 2 KV heads
    # GPT-NeoX interleaves q, k, v per head: its q is not the first third of the fused weight
    neox, _ = _sparse("gpt-neox")
    attn = neox.blocks[0].attn
    fused = attn.original_component.query_key_value.weight
    assert not torch.equal(attn.q.original_component.weight, fused[:64])
    assert torch.equal(attn.q.original_component.weight[:head_dim], fused[:head_dim])
    assert type(neox.blocks[0]).__name__ == "ParallelBlockBridge"
    sequential, _ = _sparse("gpt-neox-sequential")
    assert type(sequential.blocks[0]).__name__ == "BlockBridge"


def test_supported_architectures_lists_the_fused_qkv_families():
    assert {"Phi3ForCausalLM", "GPTNeoXForCausalLM"} <= set(sl.SUPPORTED_ARCHITECTURES)


def test_an_unsupported_feature_of_a_fused_qkv_layer_names_the_layer():
    """Detection is by the HF module's attributes, not the architecture name."""
    hf_model = _random_hf(FAMILIES["phi3"]())
    hf_model.model.layers[1].self_attn.key_multiplier = 2.0
    with pytest.raises(sl.UnsupportedModelError, match=r"blocks\.1\.attn.*scaled keys"):
        sl.HookedSparseTransformer.from_hf_model(hf_model)


def _phi3_window(window: int, stream: sl.TracingConfig = NOTHING_PRUNED):
    hf_model = _random_hf(transformers.Phi3Config(**SHAPE, num_key_value_heads=2, pad_token_id=0,
                                                  sliding_window=window))
    reference = copy.deepcopy(hf_model)
    return sl.HookedSparseTransformer.from_hf_model(hf_model, None, stream), reference


def test_a_binding_sliding_window_is_applied():
    """Phi-3 reads its window from the config (Phi-3-mini-4k: 2047). A window of 32 at 64 tokens
    binds: every layer keeps its window band and equals HF's sliding-window attention, in prefill
    and in KV-cached decode past the window."""
    from transformers import DynamicCache

    model, reference = _phi3_window(SEQ // 2)
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        expected = reference(tokens).logits
    assert cache["blocks.0.attn.hook_pattern"].window == SEQ // 2
    assert (logits - expected).abs().max() <= 1e-4

    bridged = model.original_model
    cache_kwarg = "cache" if "cache" in inspect.signature(bridged.forward).parameters else "past_key_values"
    kv_cache = DynamicCache(config=bridged.config)
    with torch.no_grad():
        steps = [bridged(input_ids=tokens[:1, :SEQ - 4], use_cache=True, **{cache_kwarg: kv_cache}).logits[:, -1]]
        for position in range(SEQ - 4, SEQ):
            step = bridged(input_ids=tokens[:1, position:position + 1], use_cache=True, **{cache_kwarg: kv_cache})
            steps.append(step.logits[:, -1])
    assert (torch.stack(steps, dim=1) - expected[:1, SEQ - 5:]).abs().max() <= 1e-4


def test_a_window_longer_than_the_input_hides_nothing_and_the_estimator_runs():
    """Phi-3-mini-128k's window (262144) never binds: the layer is a global one (no window band,
    which would keep every block), so a top_k of 3 of 8 key blocks prunes."""
    pruned = sl.TracingConfig(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1)
    model, _ = _phi3_window(262144, pruned)
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens(128), names_filter=lambda name: name.endswith("hook_pattern"))
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.window is None and pattern.block_indices.shape[-1] == 3
    assert pattern.pruned_fraction() > 0.0


def test_bidirectional_attention_in_a_fused_qkv_layer_names_the_layer():
    hf_model = _random_hf(FAMILIES["gpt-neox"]())
    hf_model.gpt_neox.layers[0].attention.is_causal = False
    with pytest.raises(sl.UnsupportedModelError, match=r"blocks\.0\.attn.*bidirectional"):
        sl.HookedSparseTransformer.from_hf_model(hf_model)


def test_the_needle_probe_reads_a_fused_qkv_layer():
    """needle_fidelity's own dense pass (hooks on hook_rot_q/k, the scale read from the HF module:
    GPT-NeoX's has ``scaling`` but no ``head_dim``) gives the figures of a collect_dense trace."""
    pruned = sl.TracingConfig(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1)
    model, _ = _sparse("gpt-neox", pruned)
    tokens = _tokens(128)[:1]
    with torch.no_grad():
        probed = sl.analysis.needle_fidelity(model, tokens, [(40, 44)])
        traced = sl.analysis.needle_fidelity(model, tokens, [(40, 44)], dense=sl.analysis.collect_dense(model, tokens))
    assert torch.allclose(probed.row_recall, traced.row_recall, atol=1e-5)
    assert torch.equal(probed.kept, traced.kept)
