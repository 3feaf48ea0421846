"""Block attribution against finite differences and dense attribution; span suppression."""

import torch

import sparse_lens as sl
from sparse_lens.analysis.interventions import block_attribution, suppress_span
from tests.conftest import sparse_and_dense, tiny_llama_config

TOKENS = torch.randint(0, 90, (1, 96), generator=torch.Generator().manual_seed(0))


def metric(logits):
    return logits[0, -1, 7] - logits[0, -1].mean()


def test_gate_gradient_matches_finite_differences():
    model, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    attribution = block_attribution(model, TOKENS, metric)
    layer, head, row, slot = 0, 1, 5, 1
    assert int(attribution.block_indices[layer][0, head, row, slot]) >= 0

    def metric_with_gate(value: float) -> float:
        def hook(pattern, hook):
            gate = torch.ones_like(pattern.block_mass)
            gate[0, head, row, slot] = value
            return pattern.with_gate(gate)

        with torch.no_grad():
            return float(metric(model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)])))

    epsilon = 1e-3
    finite_difference = (metric_with_gate(1 + epsilon) - metric_with_gate(1 - epsilon)) / (2 * epsilon)
    gradient = float(attribution.gradient[layer][0, head, row, slot])
    assert abs(gradient - finite_difference) <= 1e-3 * max(1.0, abs(finite_difference))
    assert attribution.top_blocks(3)[0][4] != 0.0


def test_gate_gradient_equals_dense_attribution_when_nothing_is_pruned():
    block = 16
    sparse, dense = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=block, key_block=block, top_k=64))
    attribution = block_attribution(sparse, TOKENS, metric, layers=[1])
    # Dense: scale every token-level attention weight by its block's gate and differentiate.
    n_blocks = TOKENS.shape[1] // block
    gate = torch.ones(1, 4, n_blocks, n_blocks, requires_grad=True)

    def gate_dense_pattern(pattern, hook):
        token_gate = gate.repeat_interleave(block, 2).repeat_interleave(block, 3)
        return pattern * token_gate

    with torch.enable_grad():
        value = metric(dense.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_pattern", gate_dense_pattern)]))
        (dense_gradient,) = torch.autograd.grad(value, [gate])
    indices = attribution.block_indices[0]
    expected = dense_gradient.gather(-1, indices.clamp(min=0)) * (indices >= 0)
    torch.testing.assert_close(attribution.gradient[0], expected, atol=1e-5, rtol=1e-4)


def test_suppressing_a_span_changes_only_later_predictions():
    model, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    result = suppress_span(model, TOKENS, (16, 32))
    assert result.blocks_removed > 0 and result.first_position == 32
    assert result.kl.shape == (1, 64) and result.mean_kl > 0
    none_removed = suppress_span(model, TOKENS, (16, 32), heads=[])
    assert none_removed.blocks_removed == 0 and none_removed.mean_kl < 1e-8
