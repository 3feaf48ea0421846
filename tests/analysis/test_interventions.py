"""Block attribution against finite differences and dense attribution; span suppression."""

import pytest
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


# ----- suppress_span against independent oracles, on 3 layers --------------------------------
SPAN = (20, 40)  # tokens of key blocks 1 and 2 (16-token blocks): keys 16..47 go
THREE_LAYERS = dict(num_hidden_layers=3, initializer_range=0.2)  # layers interact strongly


def next_token_kl(base, suppressed):
    base_logp, suppressed_logp = base.log_softmax(-1), suppressed.log_softmax(-1)
    return (base_logp.exp() * (base_logp - suppressed_logp)).sum(-1)


def dense_suppression_kl(dense, removed_keys: range):
    """Oracle without blocks: the dense bridge with the removed keys' attention set to 0 and every
    row renormalised, in every layer and head."""
    def drop_keys(pattern, hook):
        keep = torch.ones(pattern.shape[-1])
        keep[list(removed_keys)] = 0
        pattern = pattern * keep
        return pattern / pattern.sum(-1, keepdim=True)

    with torch.no_grad():
        base = dense(TOKENS)
        suppressed = dense.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", drop_keys)
                                                             for layer in range(dense.cfg.n_layers)])
    return next_token_kl(base, suppressed)


def test_suppress_span_equals_dense_attention_without_the_span_blocks_when_nothing_is_pruned():
    sparse, dense = sparse_and_dense(tiny_llama_config(**THREE_LAYERS), sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    expected = dense_suppression_kl(dense, range(16, 48))
    result = suppress_span(sparse, TOKENS, SPAN)
    assert result.first_position == 40 and result.positions.tolist() == list(range(40, 96))
    torch.testing.assert_close(result.kl, expected[:, 40:], atol=1e-4, rtol=1e-3)
    # Before the span's first key block nothing can change; inside it, predictions do.
    before = suppress_span(sparse, TOKENS, SPAN, positions=range(0, 40))
    assert before.kl[:, :16].abs().max() < 1e-6
    torch.testing.assert_close(before.kl, expected[:, :40], atol=1e-4, rtol=1e-3)
    # The oracle tells the span's blocks from their neighbours: one block later, or one block short, changes it.
    assert (dense_suppression_kl(dense, range(32, 64))[:, 40:] - expected[:, 40:]).abs().max() > 1e-2
    assert (dense_suppression_kl(dense, range(16, 32))[:, 40:] - expected[:, 40:]).abs().max() > 1e-2


def test_suppress_span_equals_explicit_block_lists_on_a_pruned_model():
    """Oracle: the same sparse model with a hook that rebuilds every chosen row's kept list in
    Python, leaving out the blocks that hold a token of the span."""
    model, _ = sparse_and_dense(tiny_llama_config(**THREE_LAYERS), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    layers, heads = [0, 2], [1, 2]
    span_blocks = {block for block in range(96 // 16) if block * 16 < SPAN[1] and (block + 1) * 16 > SPAN[0]}

    def explicit(pattern, hook):
        rows = pattern.block_indices.tolist()
        for batch_rows in rows:
            for head in heads:
                for row_index, row in enumerate(batch_rows[head]):
                    kept = [block for block in row if block >= 0 and block not in span_blocks]
                    batch_rows[head][row_index] = kept + [-1] * (len(row) - len(kept))
        return pattern.with_block_indices(torch.tensor(rows))

    with torch.no_grad():
        base = model(TOKENS)
        edited = model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", explicit) for layer in layers])
    expected = next_token_kl(base, edited)
    result = suppress_span(model, TOKENS, SPAN, layers=layers, heads=heads, positions=range(96), chunk_tokens=7)
    assert result.blocks_removed > 0
    torch.testing.assert_close(result.kl, expected, atol=1e-5, rtol=1e-4)
    assert result.kl[:, :16].abs().max() < 1e-6 and expected[:, 40:].max() > 1e-3


def test_suppress_span_rejects_bad_spans_and_positions():
    from sparse_lens.errors import InvalidPositionsError, InvalidSpanError

    model, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    for span in [(5, 5), (90, 97), (-1, 3)]:
        with pytest.raises(InvalidSpanError):
            suppress_span(model, TOKENS, span)
    with pytest.raises(InvalidPositionsError):
        suppress_span(model, TOKENS, SPAN, positions=[96])


def test_top_blocks_labels_the_chosen_layers():
    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    attribution = block_attribution(model, TOKENS, metric, layers=[2, 0])
    assert attribution.layers == [2, 0]
    top = attribution.top_blocks(50)
    assert {entry[0] for entry in top} == {2, 0}
    for layer, head, row, block, value in top:  # each value is the gradient of the layer it is labelled with
        gradient = attribution.gradient[attribution.layers.index(layer)][0, head, row]
        indices = attribution.block_indices[attribution.layers.index(layer)][0, head, row]
        assert float(gradient[indices == block]) == value


def test_top_blocks_rank_kept_blocks_by_absolute_attribution():
    model, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    attribution = block_attribution(model, TOKENS, metric)
    every = attribution.top_blocks(10_000)  # more than there are slots: every kept block, no unused slot
    assert len(every) == sum(int((indices[0] >= 0).sum()) for indices in attribution.block_indices)
    assert all(block >= 0 for _, _, _, block, _ in every)
    magnitudes = [abs(value) for *_, value in every]
    assert magnitudes == sorted(magnitudes, reverse=True) and min(value for *_, value in every[:20]) < 0


def test_suppress_span_unembeds_chunk_tokens_positions_at_a_time_and_reports_the_first_measured():
    model, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    widths = []
    handle = model.unembed.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    try:
        result = suppress_span(model, TOKENS, (16, 32), chunk_tokens=7)
    finally:
        handle.remove()
    assert result.kl.shape == (1, 64) and max(widths) == 7
    chosen = suppress_span(model, TOKENS, (16, 32), positions=[20, 95])
    assert chosen.first_position == 20 and chosen.positions.tolist() == [20, 95]


def test_bad_suppressions_and_attributions_raise_named_errors():
    model, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    for options in (dict(heads=[9]), dict(layers=[9]), dict(heads=[-1]), dict(layers=["0"])):  # 2 layers, 4 heads
        with pytest.raises(sl.InvalidPathError):
            suppress_span(model, TOKENS, (16, 32), **options)
    for layers in ([9], []):
        with pytest.raises(sl.InvalidPathError):
            block_attribution(model, TOKENS, metric, layers=layers)
    with pytest.raises(sl.InvalidSpanError, match="no position after"):
        suppress_span(model, TOKENS, (90, 96))
    assert suppress_span(model, TOKENS, (90, 96), positions=[40, 95]).kl.shape == (1, 2)  # chosen positions: fine
    with pytest.raises(sl.InvalidSpanError, match="first key block"):
        suppress_span(model, TOKENS, (0, 8))
    with pytest.raises(sl.InvalidSpanError, match="first key block"):
        suppress_span(model, TOKENS, (15, 20))
