"""Observe mode: exact dense attention (fused SDPA kernels with their lse) with the estimate beside it."""

from __future__ import annotations

import pytest
import torch

import sparse_lens as sl
import sparse_lens.tl.attention as attention
from tests.conftest import sparse_and_dense, tiny_qwen2_config

SEQ = 120  # not a multiple of the 16-token blocks


@pytest.mark.parametrize("backend", ["auto", "reference"])  # Triton masses: tests/kernels
def test_observe_equals_the_dense_bridge_and_block_mass_rows_sum_to_recall(backend):
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3, mode="observe", backend=backend,
                             estimator="stream")
    sparse, dense = sparse_and_dense(tiny_qwen2_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(5))
    names = lambda name: name.endswith(("hook_pattern", "hook_z"))  # noqa: E731
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens, names_filter=names)
        dense_logits, dense_cache = dense.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_z"], dense_cache[f"blocks.{layer}.attn.hook_z"],
                                   atol=1e-4, rtol=1e-4)
        assert pattern.mode == "observe" and pattern.pruned_fraction() > 0.3
        # Brute force: the dense bridge's token-level pattern, summed over the kept blocks' keys.
        probs = dense_cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
        key_block_of = torch.arange(SEQ) // 16
        kept = (key_block_of[None, None, None, :, None] == pattern.block_indices[:, :, :, None, None, :]).any(-1)
        kept = kept.squeeze(3).repeat_interleave(16, dim=2)[:, :, :SEQ]  # [batch, head, q, k]
        per_query = (probs * kept).sum(-1)
        recall = torch.nn.functional.pad(per_query, (0, 128 - SEQ)).unflatten(-1, (8, 16)).sum(-1)
        recall = recall / torch.tensor([16.0] * 7 + [SEQ - 112.0])
        torch.testing.assert_close(pattern.block_mass.sum(-1), recall, atol=1e-5, rtol=1e-5)
        assert recall[..., -1].min() < 0.999  # pruned rows lose mass: the check has teeth


def test_observe_has_no_token_cap_by_default():
    assert sl.StreamConfig().observe_max_tokens is None
    cfg = sl.StreamConfig(mode="observe")
    query, key = torch.zeros(1, 2, 70_000, 8), torch.zeros(1, 1, 70_000, 8)
    attention._check_observe_fits(query, key, key, 0.3, cfg)  # 70k tokens > the old 65,536 cap: accepted
    with pytest.raises(sl.ContextTooLongError, match="observe_max_tokens=1000"):
        attention._check_observe_fits(query, key, key, 0.3, cfg.replace(observe_max_tokens=1000))
    with pytest.raises(sl.InvalidConfigError):
        sl.StreamConfig(observe_max_tokens=0)


def test_too_long_for_memory_raises_with_the_estimate(monkeypatch):
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3, mode="observe")
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), stream)
    tokens = torch.randint(0, 90, (1, 64))
    needed = sl.kernels.dense_attention_bytes(torch.zeros(1, 6, 64, 16), torch.zeros(1, 2, 64, 16),
                                              torch.zeros(1, 2, 64, 16), scale=0.25)
    assert needed >= 6 * 64 * 16 * 4 + 6 * 64 * 4  # at least the output and the lse
    monkeypatch.setattr(attention.memory, "free_bytes", lambda device: needed - 1)
    with pytest.raises(sl.ContextTooLongError, match=r"needs about 0\.00 GiB per layer .* free"):
        sparse(tokens)
    monkeypatch.setattr(attention.memory, "free_bytes", lambda device: needed)
    sparse(tokens)  # fits exactly
    with sparse.stream_settings(mode="sparse"):
        monkeypatch.setattr(attention.memory, "free_bytes", lambda device: 0)
        sparse(tokens)  # the check is observe mode's only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused SDPA kernels with their lse)")
def test_observe_on_cuda_equals_the_dense_bridge():
    """On CUDA observe mode runs the fused SDPA entry points that return the lse (flash / cuDNN, bf16):
    its output must be the dense bridge's, layer by layer, and the kept masses at most 1 a row."""
    stream = sl.StreamConfig(query_block=64, key_block=64, top_k=4, mode="observe")
    sparse, dense = sparse_and_dense(tiny_qwen2_config(), stream)
    sparse, dense = sparse.to("cuda", torch.bfloat16), dense.to("cuda", torch.bfloat16)
    tokens = torch.randint(0, 90, (1, 4096), generator=torch.Generator().manual_seed(5)).cuda()
    names = lambda name: name.endswith(("hook_pattern", "hook_z"))  # noqa: E731
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens, names_filter=names)
        dense_logits, dense_cache = dense.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits.float(), dense_logits.float(), atol=0.05, rtol=0.05)
    for layer in range(2):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_z"].float(),
                                   dense_cache[f"blocks.{layer}.attn.hook_z"].float(), atol=0.02, rtol=0.02)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.mode == "observe" and pattern.pruned_fraction() > 0.5
        assert bool((pattern.block_mass.sum(-1) <= 1.001).all()) and bool((pattern.block_mass >= 0).all())
