"""Sparse attention that keeps every causal block must reproduce the dense TransformerLens bridge."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels import ESTIMATORS, estimate_blocks
from tests.conftest import sparse_and_dense, tiny_llama_config, tiny_qwen2_config

FULL = dict(query_block=16, key_block=16, top_k=64, sink_blocks=1, local_blocks=1)


@pytest.mark.parametrize("make_config", [tiny_llama_config, tiny_qwen2_config], ids=["llama", "qwen2"])
@pytest.mark.parametrize("seq", [200, 64])  # 200 is not a multiple of the block
def test_full_top_k_equals_dense_bridge(make_config, seq):
    sparse, dense = sparse_and_dense(make_config(), sl.StreamConfig(**FULL))
    tokens = torch.randint(0, 90, (2, seq), generator=torch.Generator().manual_seed(seq))
    names = lambda name: name.endswith(("hook_z", "hook_pattern", "hook_rot_q", "hook_resid_post"))  # noqa: E731
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens, names_filter=names)
        dense_logits, dense_cache = dense.run_with_cache(tokens, names_filter=names)
    assert (logits - dense_logits).abs().max() <= 1e-4
    for layer in range(2):
        for hook in ("attn.hook_z", "attn.hook_rot_q", "hook_resid_post"):
            name = f"blocks.{layer}.{hook}"
            assert cache[name].shape == dense_cache[name].shape, name
            assert (cache[name] - dense_cache[name]).abs().max() <= 1e-4, name
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert isinstance(pattern, sl.BlockSparsePattern)
        assert pattern.pruned_fraction() == 0.0
        torch.testing.assert_close(pattern.recall(), torch.ones_like(pattern.recall()))
        dense_pattern = dense_cache[f"blocks.{layer}.attn.hook_pattern"]
        assert (pattern.token_probs() - dense_pattern).abs().max() <= 1e-5


def test_observe_mode_runs_dense_and_records_the_estimate():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3, mode="observe")
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens)
        dense_logits, dense_cache = dense.run_with_cache(tokens)
    assert (logits - dense_logits).abs().max() <= 1e-4
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.mode == "observe" and pattern.pruned_fraction() > 0.5
    # block_mass is the dense mass in the kept blocks, so a row sums to its recall (< 1 when pruned)
    token_level = pattern.token_probs()
    dense_pattern = dense_cache["blocks.1.attn.hook_pattern"]
    kept = token_level > 0
    assert (token_level[kept] - dense_pattern[kept]).abs().max() <= 1e-5
    recall_by_tokens = (dense_pattern * kept).sum(-1).unflatten(-1, (10, 16)).mean(-1)
    torch.testing.assert_close(pattern.recall(), recall_by_tokens, atol=1e-5, rtol=1e-5)
    assert pattern.recall()[:, :, -1].max() < 1.0


def test_pruning_changes_the_output_but_keeps_it_finite():
    sparse, dense = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    tokens = torch.randint(0, 90, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens)
        dense_logits = dense(tokens)
    assert torch.isfinite(logits).all()
    assert (logits - dense_logits).abs().max() > 1e-3
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert 0.8 < pattern.pruned_fraction() < 1.0
    torch.testing.assert_close(pattern.recall(), torch.ones_like(pattern.recall()))


@pytest.mark.parametrize("make_config", [tiny_llama_config, tiny_qwen2_config], ids=["llama", "qwen2"])
def test_dense_mode_equals_the_dense_bridge_and_fires_no_pattern(make_config):
    sparse, dense = sparse_and_dense(make_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2, mode="dense"))
    tokens = torch.randint(0, 90, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens)
        dense_logits = dense(tokens)
    assert (logits - dense_logits).abs().max() <= 1e-4
    assert not any(name.endswith("hook_pattern") for name in cache.keys())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_runs_the_model_and_the_pattern_records_it(estimator):
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, estimator=estimator, min_blocks=2, top_p=0.7)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, 192), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens)
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert torch.isfinite(logits).all() and pattern.block_indices.shape == (1, 4, 12, 4)
    expected = estimate_blocks(pattern.query, pattern.key, scale=pattern.scale, **stream.estimator_kwargs())
    assert torch.equal(pattern.block_indices, expected)
    assert 0.45 < pattern.pruned_fraction() < 1.0  # 4 of up to 12 key blocks kept per row
