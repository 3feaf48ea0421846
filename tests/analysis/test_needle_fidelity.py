"""needle_fidelity on a tiny model, every figure recomputed by brute force from a plain dense bridge."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.needle import NeedleProbe
from sparse_lens.data import NeedleSample
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, BLOCK, TOP_K = 160, 16, 4
SPANS = [(20, 37), (90, 100)]  # the first straddles key blocks 1 and 2


@pytest.fixture(scope="module")
def models():
    stream = sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=TOP_K)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return sparse, dense, tokens


def brute_force(sparse, dense, tokens, position):
    """Dense T x T rows from the plain bridge and block indices from an observe-mode run."""
    with torch.no_grad():
        _, dense_cache = dense.run_with_cache(tokens)
        with sparse.stream_settings(mode="observe"):
            _, observed = sparse.run_with_cache(tokens)
    rows, indices = [], []
    for layer in range(sparse.cfg.n_layers):
        rows.append(dense_cache[f"blocks.{layer}.attn.hook_pattern"][0, :, position])  # [head, key]
        indices.append(observed[f"blocks.{layer}.attn.hook_pattern"].block_indices[0, :, position // BLOCK])
    return rows, indices


@pytest.mark.parametrize("position", [SEQ - 1, 130])
def test_needle_figures_match_brute_force(models, position):
    sparse, dense, tokens = models
    result = sl.needle_fidelity(sparse, tokens, SPANS, answer_position=position, threshold=0.05)
    rows, indices = brute_force(sparse, dense, tokens, position)
    n_layers, n_heads = sparse.cfg.n_layers, sparse.cfg.n_heads
    assert result.needle_mass.shape == result.kept.shape == (len(SPANS), n_layers, n_heads)
    assert result.answer_position == position and result.query_block_index == position // BLOCK
    for layer in range(n_layers):
        for head in range(n_heads):
            row = rows[layer][head]
            kept_blocks = {b for b in indices[layer][head].tolist() if b >= 0}
            kept_keys = [k for k in range(position + 1) if k // BLOCK in kept_blocks]
            assert float(result.row_recall[layer, head]) == pytest.approx(float(row[kept_keys].sum()), abs=1e-5)
            for needle, (start, end) in enumerate(SPANS):
                mass = float(row[start:end].sum())
                needle_blocks = set(range(start // BLOCK, (end - 1) // BLOCK + 1))
                kept_mass = float(sum(row[k] for k in range(start, end) if k // BLOCK in kept_blocks))
                assert float(result.needle_mass[needle, layer, head]) == pytest.approx(mass, abs=1e-5)
                assert float(result.needle_mass_kept[needle, layer, head]) == pytest.approx(kept_mass, abs=1e-5)
                assert bool(result.kept[needle, layer, head]) == bool(needle_blocks & kept_blocks)
    heads = [(n, layer, h) for n in range(2) for layer in range(n_layers) for h in range(n_heads)
             if result.needle_mass[n, layer, h] >= 0.05]
    missed = [index for index in heads if not result.kept[index]]
    assert result.needle_heads() == heads and result.missed_heads() == missed
    summary = result.summary()
    assert summary["needle_heads"] == len(heads) and summary["missed_heads"] == len(missed)
    assert summary["kept_share"] == (None if not heads else pytest.approx(1 - len(missed) / len(heads)))
    assert [len(n["missed"]) for n in summary["needles"]] == [len(result.missed_heads(n)) for n in range(2)]
    assert 0 < len(missed) < len(heads)  # the case is not trivial at this budget


def test_dense_trace_hooks_and_sample_agree(models):
    """From a DenseTrace, from hooks on a dense forward, and from a NeedleSample: the same figures."""
    sparse, _, tokens = models
    from_hooks = sl.needle_fidelity(sparse, tokens, SPANS)
    from_trace = sl.needle_fidelity(sparse, tokens, SPANS, dense=sl.collect_dense(sparse, tokens))
    sample = NeedleSample("", tokens[0].tolist(), ["x"], SPANS, ["a", "b"], 0.5)
    from_sample = sl.needle_fidelity(sparse, sample)
    for other in (from_trace, from_sample):
        assert torch.allclose(from_hooks.needle_mass, other.needle_mass, atol=1e-5)
        assert torch.equal(from_hooks.kept, other.kept)
    assert from_hooks.to_dict()["stream"]["top_k"] == TOP_K


def test_every_needle_block_kept_when_nothing_is_pruned(models):
    sparse, _, tokens = models
    result = sl.needle_fidelity(sparse, tokens, SPANS, stream=sparse.stream.replace(top_k=64), threshold=0.0)
    assert bool(result.kept.all()) and result.kept_share() == 1.0 and result.missed_heads() == []
    assert torch.allclose(result.needle_mass, result.needle_mass_kept) and torch.allclose(result.row_recall, torch.ones(1))


def test_probe_rejects_spans_after_the_answer():
    probe = NeedleProbe([(10, 20)], sl.StreamConfig(query_block=16, key_block=16, top_k=4), 1, answer_position=15)
    with pytest.raises(ValueError, match="before the answer"):
        probe.add_layer(0, torch.zeros(1, 2, 32, 8), torch.zeros(1, 1, 32, 8), 1.0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gpt-oss"])
@pytest.mark.parametrize("through_trace", [False, True])
def test_needle_figures_use_the_layers_window_softcap_and_sinks(family, through_trace):
    """On a windowed / soft-capped / sink model the probe's dense needle mass per (layer, head)
    equals the model's own attention row (token_probs of an unpruned sparse run, which applies the
    window, the cap and the sink); a needle older than the window has no mass in the windowed
    layer 0, whose band keeps everything it can see (row recall 1)."""
    from tests.analysis.test_fidelity import _windowed_model

    seq, block = 128, 16
    stream = sl.TracingConfig(query_block=block, key_block=block, top_k=3, sink_blocks=1, local_blocks=1)
    model = _windowed_model(family, stream)
    tokens = torch.randint(0, 101, (1, seq), generator=torch.Generator().manual_seed(1))
    spans = [(40, 50), (118, 122)]  # the first older than layer 0's 16-token window at the last query
    dense = sl.collect_dense(model, tokens) if through_trace else None
    result = sl.needle_fidelity(model, tokens, spans, dense=dense)
    with model.stream_settings(top_k=seq // block):  # nothing pruned: the model's exact rows
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    for layer in range(2):
        row = cache[f"blocks.{layer}.attn.hook_pattern"].token_probs(max_tokens=seq)[0, :, -1]  # [head, key]
        for needle, (start, end) in enumerate(spans):
            torch.testing.assert_close(result.needle_mass[needle, layer], row[:, start:end].sum(-1), atol=1e-5, rtol=1e-4)
        if layer == 0:  # the band keeps every key the window lets the row see (a sink's share is no key's)
            torch.testing.assert_close(result.row_recall[0], row.sum(-1), atol=1e-5, rtol=1e-4)
    assert float(result.needle_mass[0, 0].abs().max()) == 0.0


def test_a_dense_trace_of_another_model_or_other_tokens_is_refused(models):
    sparse, _, tokens = models
    other_weights, _ = sparse_and_dense(tiny_llama_config(), sparse.stream, seed=1)
    dense = sl.collect_dense(sparse, tokens)
    with pytest.raises(sl.TraceMismatchError, match="another model"):
        sl.needle_fidelity(other_weights, tokens, SPANS, dense=dense)
    with pytest.raises(sl.TraceMismatchError, match="other tokens"):
        sl.needle_fidelity(sparse, (tokens + 1) % 90, SPANS, dense=dense)


@pytest.mark.parametrize("spans, position, error", [
    ([(20, 37)], SEQ, sl.InvalidPositionsError),  # % wrapped it to 0 (and SEQ + 30 to 30, silently)
    ([(20, 37)], SEQ + 30, sl.InvalidPositionsError),
    ([(20.5, 37)], -1, sl.InvalidSpanError),  # int() truncated it to (20, 37)
    ([(20, 20)], -1, sl.InvalidSpanError),
    ([(20, SEQ + 1)], -1, sl.InvalidSpanError),
    ([(20, 37)], 30, sl.InvalidSpanError),  # after the answer
    ([], -1, sl.InvalidSpanError),
])
def test_bad_needles_or_answer_position_are_refused_before_any_forward(models, spans, position, error):
    sparse, _, tokens = models
    forwards = []
    handle = sparse.blocks[0].register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with pytest.raises(error):
            sl.needle_fidelity(sparse, tokens, spans, answer_position=position)
    finally:
        handle.remove()
    assert not forwards
