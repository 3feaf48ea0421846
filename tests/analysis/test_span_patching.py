"""Span patching against a brute-force loop of activation patching (a full clean cache and plain
hooks), on a 3-layer pruned sparse model and on the dense bridge."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.span_patching import block_spans, span_patch
from sparse_lens.errors import InvalidConfigError, InvalidPathError, InvalidSpanError, LogitsNotKeptError, ShapeError
from tests.conftest import sparse_and_dense, tiny_llama_config

GENERATOR = torch.Generator().manual_seed(5)
CLEAN = torch.randint(0, 90, (1, 64), generator=GENERATOR)
CORRUPTED = torch.randint(0, 90, (1, 64), generator=GENERATOR)
SPANS = [(0, 16), (20, 37), (30, 48), (48, 64)]  # overlapping spans are allowed: one forward each
HOOKS = {"resid_pre": "blocks.{}.hook_resid_pre", "resid_post": "blocks.{}.hook_resid_post", "z": "blocks.{}.attn.hook_z"}


def metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 9]


@pytest.fixture(scope="module")
def models():
    config = tiny_llama_config(num_hidden_layers=3, initializer_range=0.2)
    pruned, _ = sparse_and_dense(config, sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    unpruned, dense = sparse_and_dense(config, sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    return pruned, unpruned, dense


def brute_force(model, activation, ablation, units):
    """One forward per (unit, span), the replacement taken from a full clean cache."""
    names = [HOOKS[activation].format(layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(CLEAN, names_filter=lambda name: name in names)
        run = CORRUPTED if ablation == "patch" else CLEAN
        results = torch.zeros(len(units), len(SPANS))
        for row, (layer, head) in enumerate(units):
            source = clean[names[layer]]
            for column, (start, end) in enumerate(SPANS):
                def hook(value, hook, start=start, end=end, head=head, source=source):
                    value = value.clone()
                    for position in range(start, end):
                        if ablation == "patch":
                            new = source[:, position]
                        elif ablation == "mean":
                            new = source.mean(dim=1)
                        else:
                            new = torch.zeros_like(source[:, position])
                        if head is None:
                            value[:, position] = new
                        else:
                            value[:, position, head] = new[:, head]
                    return value

                results[row, column] = metric(model.run_with_hooks(run, fwd_hooks=[(names[layer], hook)]))
        return results


@pytest.mark.parametrize("activation, ablation", [("resid_pre", "patch"), ("resid_post", "mean"), ("z", "zero"), ("z", "patch"),
                                                 ("z", "mean")])
def test_equals_the_brute_force_loop_on_a_pruned_model(models, activation, ablation):
    pruned = models[0]
    heads = [(0, 1), (1, 2), (2, 0)] if activation == "z" else None
    units = heads or [(layer, None) for layer in range(3)]
    result = span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, activation=activation, heads=heads, ablation=ablation,
                        progress=False)
    assert result.shape == (len(units), len(SPANS))
    expected = brute_force(pruned, activation, ablation, units)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-5)
    assert expected.std() > 1e-2  # spans and layers differ: a wrong span or layer would show


def test_default_heads_are_every_head_layer_major_and_positions_keep_the_last_logits(models):
    pruned = models[0]
    every_head = span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS[:2], activation="z", layers=[1], progress=False)
    expected = brute_force(pruned, "z", "patch", [(1, head) for head in range(4)])[:, :2]
    torch.testing.assert_close(every_head, expected, atol=1e-4, rtol=1e-5)
    last = span_patch(pruned, CLEAN, CORRUPTED, lambda logits: logits[0, 0, 5] - logits[0, 0, 9], SPANS[:2],
                      activation="z", layers=[1], positions=[63], progress=False)
    torch.testing.assert_close(last, every_head, atol=1e-5, rtol=1e-5)


def test_default_heads_over_two_layers_are_layer_major(models):
    pruned = models[0]
    result = span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, activation="z", layers=[0, 2], progress=False)
    expected = brute_force(pruned, "z", "patch", [(layer, head) for layer in (0, 2) for head in range(4)])
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("activation", ["resid_post", "z"])
def test_mean_ablation_takes_each_batch_rows_own_mean(models, activation):
    """Row 1 of a batch of two (row 0 other tokens) ablates to its own mean: as if run alone."""
    pruned = models[0]
    together = span_patch(pruned, torch.cat([CORRUPTED, CLEAN]), None, lambda logits: metric(logits[1:]), SPANS[:2],
                          activation=activation, layers=[0, 1], ablation="mean", progress=False)
    alone = span_patch(pruned, CLEAN, None, metric, SPANS[:2], activation=activation, layers=[0, 1], ablation="mean",
                       progress=False)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)


def test_equals_the_dense_bridge_when_nothing_is_pruned(models):
    _, unpruned, dense = models
    results = [span_patch(model, CLEAN, CORRUPTED, metric, SPANS, layers=[1, 2], progress=False) for model in (unpruned, dense)]
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_positions_before_the_span_are_unchanged(models):
    """Patching [32, 48) at layer 1 leaves the predictions of query blocks before it as in the corrupted run."""
    pruned = models[0]
    kept = []

    def record(logits):
        kept.append(logits)
        return logits[0, -1, 0]

    span_patch(pruned, CLEAN, CORRUPTED, record, [(32, 48)], layers=[1], progress=False)
    with torch.no_grad():
        corrupted_logits = pruned(CORRUPTED)
    torch.testing.assert_close(kept[0][:, :32], corrupted_logits[:, :32], atol=1e-5, rtol=0)
    assert (kept[0][:, 32:48] - corrupted_logits[:, 32:48]).abs().amax(-1).min() > 1e-3  # the span's own positions move


def test_block_spans():
    assert block_spans(40, 16) == [(0, 16), (16, 32), (32, 40)]
    for bad in (0, -4, True, 2.5):  # True is an int to Python: it would read as 1-token spans
        with pytest.raises(InvalidSpanError, match="span length in tokens"):
            block_spans(40, bad)
    with pytest.raises(InvalidSpanError, match="empty"):
        block_spans(0, 16)


@pytest.mark.parametrize("spans, message", [([(0, 65)], "outside"), ([(-1, 4)], "outside"), ([(5, 5)], "empty"),
                                            ([], "no spans"), ([(1, 2, 3)], "pair"), ([(0.5, 16)], "pair"),
                                            ([(True, 16)], "pair"), ([(0, 16.9)], "pair")])
def test_bad_spans_raise_named_errors(models, spans, message):
    with pytest.raises(InvalidSpanError, match=message):
        span_patch(models[0], CLEAN, CORRUPTED, metric, spans, progress=False)


def test_bad_requests_raise_named_errors(models):
    pruned = models[0]
    with pytest.raises(InvalidPathError):
        span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, layers=[3], progress=False)
    with pytest.raises(InvalidPathError):
        span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, activation="z", heads=[(0, 4)], progress=False)
    for heads in ([(0,)], [(0, 1.0)], [(0, 1, 2)]):
        with pytest.raises(InvalidPathError, match="heads"):
            span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, activation="z", heads=heads, progress=False)
    with pytest.raises(ShapeError):
        span_patch(pruned, CLEAN, None, metric, SPANS, progress=False)
    with pytest.raises(InvalidConfigError, match="activation"):
        span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, activation="hook_q", progress=False)
    with pytest.raises(InvalidConfigError, match="ablation"):
        span_patch(pruned, CLEAN, CORRUPTED, metric, SPANS, ablation="resample", progress=False)


def test_a_metric_reading_an_unkept_position_raises_a_named_error(models):
    with pytest.raises(LogitsNotKeptError):
        span_patch(models[0], CLEAN, CORRUPTED, lambda lg: lg[0, 30, 5], SPANS[:1], layers=[0], positions=[-1],
                   progress=False)


@pytest.fixture(scope="module")
def four_layers():
    config = tiny_llama_config(num_hidden_layers=4, initializer_range=0.2)
    return sparse_and_dense(config, sl.TracingConfig(query_block=16, key_block=16, top_k=2))[0]


@pytest.mark.parametrize("activation, ablation", [("resid_pre", "patch"), ("resid_post", "mean"), ("z", "zero")])
def test_equals_full_patched_forwards_bit_for_bit(four_layers, activation, ablation):
    """The oracle is span patching as it was before it started at the patched layer: one full
    forward of the patched run per span, the span hook on the clean activation. Every logit, at
    the positions before the span too, is equal bit for bit."""
    from sparse_lens.analysis.span_patching import _HOOKS, _clean_activation, _span_hook

    model, spans, layers = four_layers, [(8, 24), (40, 64)], [0, 2, 3]
    heads = [(layer, 1) for layer in layers] if activation == "z" else None
    kept = []
    span_patch(model, CLEAN, CORRUPTED, lambda logits: kept.append(logits) or logits[0, -1, 0], spans,
               activation=activation, layers=None if heads else layers, heads=heads, ablation=ablation, progress=False)
    run = CORRUPTED if ablation == "patch" else CLEAN
    with torch.no_grad():
        for index, (layer, (start, end)) in enumerate((layer, span) for layer in layers for span in spans):
            name = _HOOKS[activation].format(layer)
            source = None if ablation == "zero" else _clean_activation(model, CLEAN, name, layer, ablation)
            hook = _span_hook(source, 1 if heads else None, start, end)
            expected = model.run_with_hooks(run, fwd_hooks=[(name, hook)])
            assert torch.equal(kept[index], expected), (layer, start, end)
            assert not torch.equal(expected[:, start:], model(run)[:, start:])  # the patch changes something


def test_forward_from_layer_runs_the_later_blocks_only_and_restores_them(four_layers):
    from sparse_lens.analysis.span_patching import forward_from_layer

    model = four_layers
    calls = []
    handles = [block.attn.register_forward_pre_hook(lambda module, args, layer=layer: calls.append(layer))
               for layer, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            full = model(CORRUPTED)
            entering = model(CORRUPTED, stop_at_layer=2)
            calls.clear()
            resumed = forward_from_layer(model, entering, 2)
            assert calls == [2, 3]  # TransformerLens' start_at_layer alone would run blocks 0 and 1 too
            assert torch.equal(resumed, full)
            calls.clear()
            assert torch.equal(model(CORRUPTED), full) and calls == [0, 1, 2, 3]  # every block runs again
    finally:
        for handle in handles:
            handle.remove()
    assert all("forward" not in block.__dict__ for block in model.blocks)


@pytest.mark.parametrize("activation, layers, runs", [("resid_pre", [1], {0: 2, 1: 3, 2: 2, 3: 2}),
                                                      ("resid_post", [1], {0: 2, 1: 2, 2: 2, 3: 2}),
                                                      ("resid_pre", [1, 3], {0: 3, 1: 5, 2: 4, 3: 5})])
def test_blocks_before_the_patch_run_once_for_all_spans(four_layers, activation, layers, runs):
    """Two spans at layer 1: blocks 0 (and 1 for resid_post, whose patch enters block 2) run in the
    clean forward and the patched run's shared forward only; the later blocks once per span. At
    layers 1 and 3 the run's residual entering block 3 is carried on from block 1's (blocks 1-2
    once), not recomputed from the input (block 0 a fourth time); each layer has its clean forward."""
    calls = {layer: 0 for layer in range(4)}

    def count(module, args, layer):
        calls[layer] += 1

    handles = [block.attn.register_forward_pre_hook(lambda module, args, layer=layer: count(module, args, layer))
               for layer, block in enumerate(four_layers.blocks)]
    try:
        span_patch(four_layers, CLEAN, CORRUPTED, metric, [(0, 16), (32, 48)], activation=activation, layers=layers,
                   progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == runs


def test_forward_from_layer_refuses_a_bad_layer_stop_or_residual(four_layers):
    """A layer outside the model, a stop_at_layer not after it (TransformerLens then returned the
    logits of some other run), or a residual that is not [batch, pos, d_model] get named errors,
    and every block is put back."""
    from sparse_lens.analysis.span_patching import forward_from_layer

    model = four_layers
    with torch.no_grad():
        entering = model(CORRUPTED, stop_at_layer=2)
        for layer, kwargs in [(4, {}), (-1, {}), (1.0, {}), (True, {}), (2, {"stop_at_layer": 2}),
                              (2, {"stop_at_layer": 1}), (3, {"stop_at_layer": -1})]:
            with pytest.raises(InvalidPathError):
                forward_from_layer(model, entering, layer, **kwargs)
        for residual in (CORRUPTED, entering[0], entering[..., :32]):
            with pytest.raises(ShapeError, match="d_model"):
                forward_from_layer(model, residual, 2)
        stopped = forward_from_layer(model, entering, 2, stop_at_layer=-1)  # blocks 2 only: the residual entering 3
        assert torch.equal(stopped, model(CORRUPTED, stop_at_layer=3))
    assert all("forward" not in block.__dict__ for block in model.blocks)
