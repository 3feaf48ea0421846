"""Model families beyond Llama and Qwen2, each as a tiny random config built offline.

Per family: with every causal block kept, the logits equal the HF model's own forward and the
hooks (``hook_q_normed``/``hook_k_normed`` where present, ``hook_rot_q/k``, ``hook_z``, the
residual stream) equal TransformerLens' dense bridge. What stays unsupported raises
``UnsupportedModelError`` naming the feature and the layer.
"""

import copy
import inspect

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import sparse_lens as sl
from tests.conftest import tiny_llama_config

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
NOTHING_PRUNED = sl.TracingConfig(query_block=16, key_block=16, top_k=8, sink_blocks=1, local_blocks=1)
SEQ = 64
WINDOW = 16  # tokens: binds at SEQ
# Gemma 3 text: layer 0 sliding-window (its own RoPE base, 10 against the global layer's 10^4),
# layer 1 global; QK-norm; scores scaled by query_pre_attn_scalar ** -0.5 (24, not head_dim 16)
GEMMA3 = dict(**SHAPE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
# Gemma 2: layer 0 sliding-window, layer 1 global (its default alternation); attention and final
# logit soft-caps small enough to bind, with weights large enough (initializer_range) for scores of
# a few units
GEMMA2 = dict(**SHAPE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
              final_logit_softcapping=5.0, initializer_range=0.2)

FAMILIES = {
    # QK-norm per head (weight [d_head]), normed on [batch, head, pos, d_head] before RoPE
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=16),
    # QK-norm over the whole projection (weight [n_heads * d_head]), before the head split
    "olmo2": lambda: transformers.Olmo2Config(**SHAPE),
    # Mistral without a window, and with one exactly as long as the input (HF then passes a
    # causal mask, which must be accepted; the window hides nothing)
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=None),
    "mistral-window": lambda: transformers.MistralConfig(**SHAPE, sliding_window=SEQ),
    # ... and with a window that binds (16 of 64 tokens): every layer keeps its window band
    "mistral-window16": lambda: transformers.MistralConfig(**SHAPE, sliding_window=WINDOW),
    # Ministral 3: the Llama-4 query scale after RoPE; original_max 8 makes it bite at 64 tokens
    "ministral3": lambda: transformers.Ministral3Config(**SHAPE, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.5,
        "original_max_position_embeddings": 8}),
    # Phi: partial rotary (8 of 16 dims), parallel attention and MLP, dense q/k/v biases
    "phi": lambda: transformers.PhiConfig(**{k: v for k, v in SHAPE.items() if k != "num_key_value_heads"},
                                          partial_rotary_factor=0.5),
    # StableLM 2: partial rotary (4 of 16 dims), per-head LayerNorms on q and k, parallel residual
    "stablelm": lambda: transformers.StableLmConfig(**SHAPE, partial_rotary_factor=0.25, qk_layernorm=True,
                                                    use_parallel_residual=True),
    # Nemotron: partial rotary, LayerNorm1P
    "nemotron": lambda: transformers.NemotronConfig(**SHAPE, head_dim=16, partial_rotary_factor=0.5),
    "gemma2": lambda: transformers.Gemma2Config(**GEMMA2),
    "gemma3": lambda: transformers.Gemma3TextConfig(**GEMMA3),
}


def _random_hf(config, seed: int = 0):
    """A random HF model whose norm weights are perturbed too (HF initialises them to ones, which
    would hide a q_norm/k_norm mix-up)."""
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return hf_model


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 101, (2, seq), generator=torch.Generator().manual_seed(seq))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_hf_model_when_nothing_is_pruned(family):
    hf_model = _random_hf(FAMILIES[family]())
    reference = copy.deepcopy(hf_model)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, NOTHING_PRUNED)
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        expected = reference(tokens).logits
    for layer in range(2):  # a windowed layer keeps its band: nothing its window lets it see is pruned
        assert cache[f"blocks.{layer}.attn.hook_pattern"].pruned_fraction() == 0.0
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_equal_the_dense_bridge(family):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf_model = _random_hf(FAMILIES[family]())
    dense_hf = copy.deepcopy(hf_model)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, NOTHING_PRUNED)
    dense = build_bridge_from_module(dense_hf, dense_hf.config.architectures[0], hf_config=dense_hf.config)
    tokens = _tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, dense_cache = dense.run_with_cache(tokens)
    hooks = ["attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z", "hook_resid_pre", "hook_resid_post"]
    if family in ("qwen3", "olmo2", "stablelm", "gemma3"):
        hooks += ["attn.hook_q_normed", "attn.hook_k_normed"]
    for layer in range(2):
        for hook in hooks:
            name = f"blocks.{layer}.{hook}"
            assert cache[name].shape == dense_cache[name].shape, name
            assert (cache[name] - dense_cache[name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_decode_equals_the_hf_model(family):
    """Sparse prefill (nothing pruned), then one token at a time with HF's KV cache, as
    ``generate`` runs: each step's logits equal the HF model's on the whole sequence (positions
    reach the layers: Ministral 3's query scale reads them)."""
    assert _decode_max_error(family, n_tokens=40, n_prompt=36) <= 1e-4


def _decode_max_error(family: str, n_tokens: int, n_prompt: int) -> float:
    """Max |logit difference| between the sparse model decoding token by token after a prefill of
    ``n_prompt`` tokens and the HF model run on all ``n_tokens`` at once."""
    from transformers import DynamicCache

    hf_model = _random_hf(FAMILIES[family]())
    reference = copy.deepcopy(hf_model)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, NOTHING_PRUNED)
    tokens = _tokens(n_tokens)[:1]
    bridged = model.original_model  # HF's model, its attention replaced by the sparse bridges
    cache_kwarg = "cache" if "cache" in inspect.signature(bridged.forward).parameters else "past_key_values"
    cache = DynamicCache(config=bridged.config)
    with torch.no_grad():
        expected = reference(tokens).logits
        steps = [bridged(input_ids=tokens[:, :n_prompt], use_cache=True, **{cache_kwarg: cache}).logits[:, -1]]
        for position in range(n_prompt, n_tokens):
            step = bridged(input_ids=tokens[:, position:position + 1], use_cache=True, **{cache_kwarg: cache})
            steps.append(step.logits[:, -1])
    return float((torch.stack(steps, dim=1) - expected[:, n_prompt - 1:]).abs().max())


def test_each_family_exercises_its_feature():
    """The configs above really carry the feature their test is about (so a bug in it would show)."""
    def bridge(family):
        return sl.HookedSparseTransformer.from_hf_model(_random_hf(FAMILIES[family]())).blocks[0].attn

    assert bridge("qwen3")._qk_norm_phase == "post_reshape"
    assert bridge("olmo2")._qk_norm_phase == "pre_reshape"
    assert bridge("stablelm")._qk_norm_phase == "post_reshape"
    assert bridge("mistral-window")._sliding_window == SEQ
    for family in ("gemma2", "gemma3"):
        model = sl.HookedSparseTransformer.from_hf_model(_random_hf(FAMILIES[family]()))
        assert [block.attn._sliding_window for block in model.blocks] == [WINDOW, None]
        assert [block.attn._softcap for block in model.blocks] == ([2.0, 2.0] if family == "gemma2" else [None, None])
    phi = _random_hf(FAMILIES["phi"]())
    cos, _ = phi.model.rotary_emb(torch.zeros(1), torch.arange(4)[None])
    assert cos.shape[-1] == 8 < phi.config.hidden_size // phi.config.num_attention_heads
    # the query scale changes the output (it is not 1 at these positions)
    scaled = _random_hf(FAMILIES["ministral3"]())
    unscaled = copy.deepcopy(scaled)
    unscaled.config.rope_parameters = {**unscaled.config.rope_parameters, "llama_4_scaling_beta": 0.0}
    with torch.no_grad():
        assert (scaled(_tokens()).logits - unscaled(_tokens()).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "family, change",
    [
        ("gemma2", {"sliding_window": SEQ}),
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"final_logit_softcapping": None}),
        ("gemma2", {"query_pre_attn_scalar": 16}),
        ("gemma3", {"sliding_window": SEQ}),
        ("gemma3", {"query_pre_attn_scalar": 16}),
        ("gemma3", {"rope_parameters": {key: {"rope_type": "default", "rope_theta": 10000.0}
                                        for key in ("sliding_attention", "full_attention")}}),
        ("mistral-window16", {"sliding_window": None}),
    ],
)
def test_the_gemma_and_window_configs_bind_their_features(family, change):
    """Without its window, soft-caps, query_pre_attn_scalar or local RoPE base the HF model's
    logits change (same weights), so the equality tests above would catch a bridge that dropped it."""
    config = FAMILIES[family]()
    changed = copy.deepcopy(config)
    for name, value in change.items():
        setattr(changed, name, value)
    with torch.no_grad():
        difference = (_random_hf(config)(_tokens()).logits - _random_hf(changed)(_tokens()).logits).abs().max()
    assert difference > 1e-2


WINDOW_BLOCKS = dict(query_block=8, key_block=8, sink_blocks=1, local_blocks=1)  # the window band: 3 blocks


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("top_k", [4, 2], ids=["band-fits", "band-wider-than-top-k"])
def test_windowed_layers_keep_their_window_band_and_global_layers_are_pruned(family, top_k):
    """A windowed layer keeps exactly its window band, padded to ``top_k`` when it fits and whole
    (3 blocks > ``top_k``) when not, so its attention is exact: layer 0's ``hook_z`` equals the dense
    bridge's. The global layer 1 is estimated and pruned, and the logits then differ from HF's."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    from sparse_lens.kernels.window import window_band, window_fits

    hf_model = _random_hf(FAMILIES[family]())
    reference = copy.deepcopy(hf_model)
    dense = build_bridge_from_module(reference, reference.config.architectures[0], hf_config=reference.config)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, sl.TracingConfig(top_k=top_k, **WINDOW_BLOCKS))
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        expected, dense_cache = dense.run_with_cache(tokens)
    band = window_band(SEQ, 8, 8, WINDOW)
    assert band.shape[-1] == 3 and window_fits(WINDOW, 8, top_k) == (top_k >= 3)
    kept = cache["blocks.0.attn.hook_pattern"].block_indices
    assert kept.shape[-1] == max(top_k, 3)
    assert torch.equal(kept[..., :3], band.expand(*kept.shape[:2], -1, -1)) and bool((kept[..., 3:] == -1).all())
    assert (cache["blocks.0.attn.hook_z"] - dense_cache["blocks.0.attn.hook_z"]).abs().max() <= 1e-5
    assert cache["blocks.1.attn.hook_pattern"].pruned_fraction() > 0.3
    assert (logits - expected).abs().max() > 1e-2


PRUNED = sl.TracingConfig(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1)


@pytest.mark.parametrize("config, windowless", [
    # Mistral v0.1: 4096 below 4096 tokens
    (transformers.MistralConfig(**SHAPE, sliding_window=2 * SEQ), transformers.MistralConfig(**SHAPE, sliding_window=None)),
    (transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4 * SEQ, max_window_layers=0,
                              layer_types=["sliding_attention", "sliding_attention"]), transformers.Qwen2Config(**SHAPE)),
], ids=["mistral", "qwen2-use-sliding-window"])
def test_a_window_that_does_not_bind_is_no_window_and_the_estimator_runs(config, windowless):
    """At 128 tokens a window of 128 (or more) hides no key: the layer prunes like a global one
    (3 of 8 key blocks), exactly as the same weights without a window (one policy for both bridges:
    ``windows.binding_window``; it kept every block before)."""
    model = sl.HookedSparseTransformer.from_hf_model(_random_hf(config), None, PRUNED)
    reference = sl.HookedSparseTransformer.from_hf_model(_random_hf(windowless), None, PRUNED)
    assert model.blocks[0].attn._sliding_window is not None and reference.blocks[0].attn._sliding_window is None
    tokens = _tokens(2 * SEQ)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        expected = reference(tokens)
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.window is None and pattern.block_indices.shape[-1] == 3
        assert pattern.pruned_fraction() > 0.3
    assert (logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["gemma3", "mistral-window16", "gemma2"])
def test_padding_and_packed_sequences_are_refused_past_the_window(family):
    """HF's masks come from its "flash_attention_2" mask function (no T x T mask for sliding
    layers): padding arrives as a 2-D mask and packed sequences only as restarting position_ids;
    both are refused, as the 4-D masks were before."""
    model = sl.HookedSparseTransformer.from_hf_model(_random_hf(FAMILIES[family]()), None, NOTHING_PRUNED)
    assert model.original_model.config._attn_implementation == "flash_attention_2"
    tokens = _tokens()
    padding = torch.ones_like(tokens)
    padding[1, :3] = 0
    with pytest.raises(sl.PaddingNotSupportedError, match="padded"), torch.no_grad():
        model.original_model(input_ids=tokens, attention_mask=padding)
    packed = torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ // 2)]).expand(2, -1)
    with pytest.raises(sl.PaddingNotSupportedError, match="packed"), torch.no_grad():
        model(tokens, position_ids=packed)


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "mistral-window16"])
def test_greedy_generate_past_the_window_equals_hf(family):
    """TransformerLens' generate on the sparse model (nothing pruned; the flash_attention_2 mask
    setting, no flash-attn package) gives HF's own greedy tokens, prompt and new tokens past the window."""
    hf_model = _random_hf(FAMILIES[family]())
    reference = copy.deepcopy(hf_model)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, NOTHING_PRUNED)
    prompt = _tokens()[:1]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, stop_at_eos=False, verbose=False)
        expected = reference.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)


def test_decode_past_the_window_is_hf_sliding_window_attention():
    """HF's cache keeps a sliding layer's last ``window - 1`` keys, so decode steps (dense over the
    cache) are exact past the window: only a prefill longer than the window raises."""
    assert _decode_max_error("mistral-window", n_tokens=SEQ + 8, n_prompt=SEQ - 4) <= 1e-4


@pytest.mark.parametrize(
    "config, feature, layer",
    [
        (transformers.Gemma3TextConfig(**SHAPE, head_dim=16, use_bidirectional_attention=True),
         "bidirectional (non-causal) attention", "blocks.0.attn"),
    ],
    ids=["gemma3-bidirectional"],
)
def test_unsupported_families_name_the_feature(config, feature, layer):
    with pytest.raises(sl.UnsupportedModelError) as error:
        sl.HookedSparseTransformer.from_config(config)
    assert feature in str(error.value) and layer in str(error.value)


def test_an_unsupported_feature_in_a_supported_family_names_the_layer():
    """Detection is by the HF module's attributes, not the architecture name."""
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    hf_model.config.architectures = ["LlamaForCausalLM"]
    hf_model.model.layers[1].self_attn.key_multiplier = 2.0
    with pytest.raises(sl.UnsupportedModelError, match=r"blocks\.1\.attn.*scaled keys"):
        sl.HookedSparseTransformer.from_hf_model(hf_model)


def test_supported_architectures_lists_the_new_families():
    assert {"Qwen3ForCausalLM", "Olmo2ForCausalLM", "MistralForCausalLM", "Ministral3ForCausalLM",
            "PhiForCausalLM", "StableLmForCausalLM", "NemotronForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM"} <= set(sl.SUPPORTED_ARCHITECTURES)
