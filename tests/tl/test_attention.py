"""tl/attention.top_k_within_key_blocks: a top_k beyond a prompt's key blocks is lowered to them in
the forward (no empty slots to pay for), with the same kept blocks and the same outputs."""

import warnings

import pytest
import torch
import transformers

import sparse_lens as sl
from sparse_lens.tl.attention import top_k_within_key_blocks
from tests.conftest import sparse_and_dense, tiny_llama_config
from tests.tl.test_families import GEMMA2

SEQ, BLOCK = 64, 16  # 4 key blocks
N_KEY_BLOCKS = SEQ // BLOCK
TOKENS = torch.randint(0, 101, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _run(model, **fields):
    with torch.no_grad(), model.stream_settings(**fields):
        logits, cache = model.run_with_cache(TOKENS, names_filter=lambda name: name.endswith("hook_pattern"))
    return logits, [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]


def test_the_config_is_lowered_only_beyond_the_key_blocks():
    stream = sl.TracingConfig(query_block=BLOCK, key_block=BLOCK, top_k=9)
    assert top_k_within_key_blocks(stream, SEQ).top_k == N_KEY_BLOCKS
    assert top_k_within_key_blocks(stream, SEQ - 1).top_k == N_KEY_BLOCKS  # a partial last key block counts
    assert top_k_within_key_blocks(stream, 9 * BLOCK) is stream
    tight = sl.TracingConfig(query_block=BLOCK, key_block=BLOCK, top_k=9, sink_blocks=3, local_blocks=2)
    assert top_k_within_key_blocks(tight, SEQ) is tight  # top_k 4 < sink + local: kept as configured


def test_adaptive_keeps_top_k_above_its_min_blocks_without_a_warning():
    stream = sl.TracingConfig(query_block=BLOCK, key_block=BLOCK, top_k=9, estimator="adaptive",
                              estimator_settings=sl.AdaptiveSettings(min_blocks=N_KEY_BLOCKS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # min_blocks = top_k warns that top_p has no effect
        assert top_k_within_key_blocks(stream, SEQ).top_k == N_KEY_BLOCKS + 1


@pytest.mark.parametrize("estimator", ["stream", "rescored", "adaptive"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["sparse", "observe"])
def test_a_top_k_beyond_the_key_blocks_keeps_the_same_blocks_without_empty_slots(estimator, causal, mode):
    settings = sl.AdaptiveSettings(min_blocks=2) if estimator == "adaptive" else None
    stream = sl.TracingConfig(query_block=BLOCK, key_block=BLOCK, top_k=N_KEY_BLOCKS, estimator=estimator,
                              estimator_settings=settings, causal_selection=causal, mode=mode)
    model, _ = sparse_and_dense(tiny_llama_config(), stream)
    logits, patterns = _run(model)
    wide_logits, wide_patterns = _run(model, top_k=N_KEY_BLOCKS + 5)
    torch.testing.assert_close(wide_logits, logits, atol=0, rtol=0)
    for pattern, wide in zip(patterns, wide_patterns):
        assert wide.block_indices.shape[-1] == N_KEY_BLOCKS  # no -1 slots beyond the key blocks
        assert torch.equal(wide.block_indices, pattern.block_indices)
        torch.testing.assert_close(wide.block_mass, pattern.block_mass, atol=0, rtol=0)


def test_a_windowed_layer_and_a_global_one_stay_the_same_width():
    """Gemma 2: layer 0 keeps its window band, layer 1 runs the estimator; both rows are lowered
    alike, so the layers' patterns still stack."""
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**GEMMA2)).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, sl.TracingConfig(
        query_block=BLOCK, key_block=BLOCK, top_k=N_KEY_BLOCKS))
    logits, patterns = _run(model)
    wide_logits, wide_patterns = _run(model, top_k=N_KEY_BLOCKS + 5)
    torch.testing.assert_close(wide_logits, logits, atol=0, rtol=0)
    assert [p.block_indices.shape[-1] for p in wide_patterns] == [N_KEY_BLOCKS, N_KEY_BLOCKS]
    assert all(torch.equal(w.block_indices, p.block_indices) for w, p in zip(wide_patterns, patterns))


@pytest.mark.parametrize("cos_dtype", [torch.bfloat16, torch.float32], ids=["bf16-cos", "float32-cos"])
@pytest.mark.parametrize("kernel", [False, True], ids=["in-place-chunks", "kernel"])
@pytest.mark.parametrize("rotary_dim, full_rotary", [(16, True), (8, True), (8, False)])
def test_long_rotary_per_batch_cos_and_strided_key_equal_hf(monkeypatch, cos_dtype, kernel, rotary_dim, full_rotary):
    """apply_rotary's long-input paths (chunks rotated in place; the Triton kernel, forced here as on
    CUDA) equal HF's whole-sequence formula bit for bit, dtype included, with a cos / sin per batch
    row, a key in the bridge's transposed layout, full, half-width (GPT-OSS) and partial rotary;
    float32 cos / sin with bf16 q / k promote as HF's formula does (float32 outputs)."""
    from sparse_lens.tl import attention

    generator = torch.Generator().manual_seed(3)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1
    query, key = (torch.randn(2, 30, heads, 16, generator=generator).bfloat16().transpose(1, 2).to(device)
                  for heads in (4, 2))
    cos, sin = (torch.randn(2, 30, rotary_dim, generator=generator).to(cos_dtype).to(device) for _ in range(2))
    calls = []
    if kernel:
        monkeypatch.setattr(attention, "_rotary_on_kernel", lambda *args: calls.append(1) or True)
    chunked = attention.apply_rotary(query, key, cos, sin, full_rotary=full_rotary, chunk_tokens=7)
    whole = attention.apply_rotary(query, key, cos, sin, full_rotary=full_rotary)
    assert len(calls) == (kernel and cos_dtype == torch.bfloat16)  # other dtypes: HF's formula
    assert whole[0].dtype == torch.promote_types(torch.bfloat16, cos_dtype)
    for expected, actual in zip(whole, chunked):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
