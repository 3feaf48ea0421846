"""needle_fidelity on a tiny model, every figure recomputed by brute force from a plain dense bridge."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.needle import NeedleFidelity, NeedleProbe, needle_recall
from sparse_lens.data import NeedleSample
from sparse_lens.kernels import estimate_blocks
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


def test_needle_recall_matches_brute_force():
    """Batch row 0 or 1 of two different rows, a needle straddling three key blocks (their masses
    add), and the same patterns sliced along queries (the row is found from first_query_block)."""
    from tests.analysis.test_routes import random_patterns

    rows = [random_patterns(seed, n_layers=3, n_query_blocks=8) for seed in (0, 1)]  # 32 tokens, blocks of 4
    patterns = [sl.BlockSparsePattern(torch.cat([a.block_indices, b.block_indices]),
                                      torch.cat([a.block_mass, b.block_mass]), torch.zeros(2, 2, 32), 32, 4, 4, 1.0)
                for a, b in zip(*rows)]
    span, position = (6, 13), 29  # key blocks 1, 2, 3; query block 7
    for batch in (0, 1):
        recall = needle_recall(patterns, span, query_position=position, batch=batch)
        indices = torch.stack([pattern.block_indices[batch, :, 7] for pattern in patterns])  # [layer, head, top_k]
        in_needle = (indices >= 1) & (indices <= 3)
        mass = (torch.stack([pattern.block_mass[batch, :, 7] for pattern in patterns]) * in_needle).sum(-1)
        assert recall.needle_blocks == (1, 2, 3) and recall.query_block == 7
        assert torch.equal(recall.kept, in_needle.any(-1)) and torch.allclose(recall.mass, mass)
        assert 0 < int(recall.kept.sum()) < recall.kept.numel() and bool((in_needle.sum(-1) >= 2).any())
        sliced = needle_recall([pattern[:, :, 16:] for pattern in patterns], span, query_position=position, batch=batch)
        assert torch.equal(sliced.kept, recall.kept) and torch.equal(sliced.mass, recall.mass)
    assert not torch.equal(needle_recall(patterns, span, position, batch=0).mass, recall.mass)


def test_headline_figures_per_needle_and_at_the_threshold():
    """Hand-made figures (binary fractions, so that the threshold comparison is exact): a head at
    exactly the threshold is a needle head; per-needle figures read that needle's heads only."""
    needle_mass = torch.tensor([[[0.25, 0.125]], [[0.5, 0.375]]])  # [needle, layer, head]
    needle_mass_kept = torch.tensor([[[0.25, 0.0]], [[0.25, 0.0]]])
    result = NeedleFidelity([(0, 4), (8, 12)], [(0,), (2,)], 15, 3, needle_mass, needle_mass_kept,
                            needle_mass_kept > 0, torch.ones(1, 2), threshold=0.25)
    assert result.needle_heads() == [(0, 0, 0), (1, 0, 0), (1, 0, 1)]
    assert result.missed_heads() == [(1, 0, 1)] and result.missed_heads(0) == []
    assert result.kept_share(0) == 1.0 and result.kept_share(1) == 0.5 and result.kept_share() == pytest.approx(2 / 3)
    assert result.needle_mass_recall(0) == 1.0 and result.needle_mass_recall(1) == pytest.approx(0.25 / 0.875)
    assert result.needle_mass_recall() == pytest.approx(0.5 / 1.125)
    summary = result.summary()
    assert [needle["needle_mass_recall"] for needle in summary["needles"]] == [1.0, pytest.approx(0.25 / 0.875)]


def test_probe_figures_when_query_and_key_blocks_differ():
    """query_block 32, key_block 16: the answer at 70 is in query block 2 (key block 4); every figure
    recomputed from the estimator's kept blocks for that row and a plain softmax row. A needle may
    end on the answer token itself."""
    seq, position, spans, scale = 128, 70, [(20, 30), (60, 71)], 0.5
    stream = sl.TracingConfig(query_block=32, key_block=16, top_k=4, backend="reference")
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, seq, 8, generator=generator), torch.randn(1, 2, seq, 8, generator=generator)
    probe = NeedleProbe(spans, stream, 1, answer_position=position, threshold=0.0)
    probe.add_layer(0, query, key, scale)
    result = probe.result()
    assert result.query_block_index == 2 and result.answer_position == position
    kept_indices = estimate_blocks(query, key, scale=scale, **stream.estimator_kwargs())[0, :, 2]
    keys = key[0].repeat_interleave(2, dim=0)[:, : position + 1]  # query head h reads kv head h // 2
    row = torch.softmax(torch.einsum("hd,hkd->hk", query[0, :, position], keys) * scale, dim=-1)
    for head in range(4):
        kept_blocks = {block for block in kept_indices[head].tolist() if block >= 0}
        kept_keys = torch.tensor([k // 16 in kept_blocks for k in range(position + 1)])
        assert float(result.row_recall[0, head]) == pytest.approx(float(row[head][kept_keys].sum()), abs=1e-5)
        for needle, (start, end) in enumerate(spans):
            assert float(result.needle_mass[needle, 0, head]) == pytest.approx(float(row[head, start:end].sum()), abs=1e-5)
            assert float(result.needle_mass_kept[needle, 0, head]) == pytest.approx(
                float(row[head, start:end][kept_keys[start:end]].sum()), abs=1e-5)
            assert bool(result.kept[needle, 0, head]) == bool(kept_blocks & set(range(start // 16, (end - 1) // 16 + 1)))
    assert 0 < float(result.row_recall.min()) and float(result.row_recall.max()) < 1

