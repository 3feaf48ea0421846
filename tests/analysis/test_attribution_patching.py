"""Attribution patching against exact activation patching (brute force), the dense bridge, block
attribution, and its named errors."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparse_lens as sl
from sparse_lens.analysis.attribution_patching import attribution_patching
from sparse_lens.analysis.interventions import block_attribution
from sparse_lens.errors import GradientModeError, InvalidConfigError, InvalidPositionsError, InvalidSpanError, LogitsNotKeptError, ShapeError
from tests.conftest import sparse_and_dense, tiny_llama_config

GENERATOR = torch.Generator().manual_seed(0)
CLEAN = torch.randint(0, 90, (1, 96), generator=GENERATOR)
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 40:52] = torch.randint(0, 90, (1, 12), generator=GENERATOR)
SPANS = [(0, 32), (32, 48), (48, 96)]


def metric(logits):
    return logits[0, -1, 3] - logits[0, -1, 8]


def three_layers(top_k: int):
    return sparse_and_dense(tiny_llama_config(num_hidden_layers=3), sl.StreamConfig(query_block=16, key_block=16, top_k=top_k))


def noise_hook(epsilon: float):
    noise = torch.randn(1, 96, 64, generator=torch.Generator().manual_seed(1))
    return ("hook_embed", lambda value, hook: value + epsilon * noise)


def clean_blocks(model):
    """hook_pattern hooks that make a run keep the clean run's blocks. Block selection is piecewise
    constant in the activations, and a small perturbation can flip a near-tie somewhere; the
    gradient is the derivative at the clean run's selection, so the oracle runs there."""
    with torch.no_grad():
        _, clean = model.run_with_cache(CLEAN, names_filter=lambda name: name.endswith("hook_pattern"))
    return [(f"blocks.{layer}.attn.hook_pattern",
             lambda pattern, hook: pattern.with_block_indices(clean[hook.name].block_indices))
            for layer in range(model.cfg.n_layers)]


def exact_patching(model, corrupted_hooks, heads: bool):
    """Brute force: one clean forward per head (hook_z of that head, all positions) or per
    (layer, span) (hook_resid_pre over the span) with the corrupted run's value patched in."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_z" if heads else f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    freeze = clean_blocks(model)
    with torch.no_grad():
        with model.hooks(fwd_hooks=corrupted_hooks):
            _, corrupted = model.run_with_cache(CLEAN, names_filter=lambda name: name in names)
        clean_metric = float(metric(model(CLEAN)))
        effects = torch.zeros(n_layers, n_heads if heads else len(SPANS))
        for layer, name in enumerate(names):
            for column in range(effects.shape[1]):
                def patch(value, hook, column=column):
                    value = value.clone()
                    if heads:
                        value[:, :, column] = corrupted[name][:, :, column]
                    else:
                        start, end = SPANS[column]
                        value[:, start:end] = corrupted[name][:, start:end]
                    return value

                patched = model.run_with_hooks(CLEAN, fwd_hooks=[(name, patch)] + freeze)
                effects[layer, column] = float(metric(patched)) - clean_metric
    return effects


@pytest.mark.parametrize("top_k", [3, 64])
def test_estimate_equals_exact_patching_for_a_small_perturbation(top_k):
    model, _ = three_layers(top_k)
    epsilon = 1e-3
    corrupted_hooks = [noise_hook(epsilon)] + clean_blocks(model)
    result = attribution_patching(model, CLEAN, CLEAN, metric, positions=[-1], spans=SPANS,
                                  corrupted_fwd_hooks=corrupted_hooks)
    for heads, estimate in ((True, result.head_out), (False, result.resid_pre)):
        exact = exact_patching(model, corrupted_hooks, heads) / epsilon
        estimate = estimate / epsilon
        assert exact.abs().max() > 1e-2  # the perturbation does move the metric
        torch.testing.assert_close(estimate, exact, atol=0.03 * float(exact.abs().max()), rtol=0.0)
    # Layer 0's residual stream before the first block is the embedding: every span of it was perturbed.
    assert (result.resid_pre[0] != 0).all()


def test_checkpointed_offloaded_and_plain_runs_agree_and_positions_change_nothing():
    model, _ = three_layers(3)
    model.mlp_chunk_tokens = 40
    runs = [attribution_patching(model, CLEAN, CORRUPTED, metric, positions=positions, spans=SPANS, gates=True,
                                 checkpoint=checkpoint, offload=checkpoint, offload_activations=checkpoint)
            for checkpoint, positions in ((False, None), (True, [-1]), (True, [5, 95]))]
    for run in runs[1:]:
        for field in ("head_out", "resid_pre", "block_gate"):
            torch.testing.assert_close(getattr(run, field), getattr(runs[0], field), atol=1e-6, rtol=1e-5)
    # Spans before the corrupted tokens [40, 52) cannot carry any difference, at any layer.
    assert float(runs[0].resid_pre[:, 0].abs().max()) == 0.0 and float(runs[0].resid_pre[:, 1:].abs().max()) > 0


def test_equals_the_dense_bridge_when_nothing_is_pruned():
    sparse, dense = three_layers(64)
    results = [attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[-1], spans=SPANS) for model in (sparse, dense)]
    torch.testing.assert_close(results[0].head_out, results[1].head_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0].resid_pre, results[1].resid_pre, atol=1e-5, rtol=1e-4)
    assert abs(results[0].clean_metric - results[1].clean_metric) < 1e-5
    assert abs(results[0].corrupted_metric - results[1].corrupted_metric) < 1e-5
    assert results[0].head_out.abs().max() > 1e-4


def test_gate_estimates_are_minus_block_attribution():
    model, _ = three_layers(3)
    result = attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[-1], heads=False, gates=True)
    attribution = block_attribution(model, CLEAN, metric)  # all positions, checkpointed
    torch.testing.assert_close(result.block_indices, torch.stack(attribution.block_indices))
    torch.testing.assert_close(result.block_gate, -torch.stack(attribution.gradient), atol=1e-6, rtol=1e-5)
    assert result.block_gate.abs().max() > 0
    assert result.head_out is None and result.resid_pre is None


def test_bad_input_gets_named_errors_and_leaves_the_model_clean():
    model, dense = three_layers(3)
    with torch.no_grad():
        before = model(CLEAN)
    with pytest.raises(LogitsNotKeptError):
        attribution_patching(model, CLEAN, CORRUPTED, lambda logits: logits[0, 5, 3], positions=[-1])
    with pytest.raises(InvalidSpanError):
        attribution_patching(model, CLEAN, CORRUPTED, metric, spans=[(10, 10)])
    with pytest.raises(InvalidSpanError):
        attribution_patching(model, CLEAN, CORRUPTED, metric, spans=[(90, 100)])
    with pytest.raises(InvalidPositionsError):
        attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[96])
    with pytest.raises(ShapeError):
        attribution_patching(model, CLEAN, CORRUPTED[:, :80], metric)
    with pytest.raises(GradientModeError):
        attribution_patching(dense, CLEAN, CORRUPTED, metric, gates=True)
    with model.stream_settings(mode="observe"), pytest.raises(GradientModeError):
        attribution_patching(model, CLEAN, CORRUPTED, metric)
    with model.stream_settings(mode="dense"), pytest.raises(GradientModeError):
        block_attribution(model, CLEAN, metric)
    with pytest.raises(InvalidConfigError, match="checkpoint"):  # offloading needs checkpoints (was ignored)
        attribution_patching(model, CLEAN, CORRUPTED, metric, checkpoint=False, offload=True)
    with pytest.raises(InvalidConfigError, match="segment_layers"):
        attribution_patching(model, CLEAN, CORRUPTED, metric, segment_layers=0)
    with pytest.raises(InvalidConfigError, match="nothing to estimate"):
        attribution_patching(model, CLEAN, CORRUPTED, metric, heads=False)
    # Nothing left installed after the failures: no hook, no checkpointing, the same logits.
    assert "forward" not in model.blocks[0].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(CLEAN), before)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live storages created by ops inside the mode (weights and inputs excluded).
    A storage counts from the op that creates it until it is freed (a weak reference expires)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = StorageWeakRef(tensor.untyped_storage())
                self.live[storage.cdata] = (storage, tensor.untyped_storage().nbytes())
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def test_peak_memory_grows_linearly_with_the_sequence():
    sparse, dense = sparse_and_dense(tiny_llama_config(num_hidden_layers=3),
                                     sl.StreamConfig(query_block=16, key_block=16, top_k=4, keep_qk=False))

    def peak(model, length):
        tokens = torch.randint(0, 90, (1, length), generator=torch.Generator().manual_seed(length))
        with PeakLiveBytes() as recorder:
            attribution_patching(model, tokens, tokens.flip(-1), metric, positions=[-1], spans=64)
        return recorder.peak

    sparse_ratio = peak(sparse, 1024) / peak(sparse, 512)
    assert sparse_ratio < 2.3, f"peak memory grew {sparse_ratio:.2f}x for 2x the tokens"
    # The measurement can see quadratic growth: the dense bridge's T x T attention.
    dense_ratio = peak(dense, 1024) / peak(dense, 512)
    assert dense_ratio > 3.0, dense_ratio
    print(f"peak ratio for 2x tokens: sparse {sparse_ratio:.2f}, dense {dense_ratio:.2f}")


def test_ioi_heads_on_the_default_model_match_exact_head_patching(smollm2):
    """On an IOI prompt the strongest estimated heads have the exact patching effects (within 25%),
    and heads estimated near zero have small exact effects. (All 270 heads: benchmarks/attribution_ioi.py,
    Pearson 0.93, Spearman 0.99, top-10 overlap 10/10.)"""
    model = smollm2
    clean = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")

    def logit_difference(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]

    # Base run: the first prompt; patched value: the second prompt's head outputs (TL's direction).
    estimate = attribution_patching(model, clean, corrupted, logit_difference, positions=[-1])
    with torch.no_grad():
        base = float(logit_difference(model(clean)))
        _, cache = model.run_with_cache(corrupted, names_filter=lambda name: name.endswith("attn.hook_z"))

        def exact(layer, head):
            def patch(z, hook):
                z[:, :, head] = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
                return z

            patched = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
            return float(logit_difference(patched)) - base

        for layer, head, value in estimate.top_heads(3):
            assert abs(value) > 1.0
            assert abs(exact(layer, head) - value) <= 0.25 * abs(value), (layer, head, value)
        smallest = estimate.head_out.abs().flatten().argsort()[:2].tolist()
        for index in smallest:
            assert abs(exact(index // model.cfg.n_heads, index % model.cfg.n_heads)) < 0.1


def test_the_estimator_runs_once_per_layer_and_run(monkeypatch):
    """Two forwards estimate (clean and corrupted); the backward's recomputations (clean segments and
    blocks, corrupted segments) reuse those block selections, and give the plain backward's estimates."""
    import sparse_lens.tl.attention as attention

    model, _ = three_layers(3)
    plain = attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[-1], checkpoint=False)
    calls = []
    estimate_blocks = attention.estimate_blocks
    monkeypatch.setattr(attention, "estimate_blocks", lambda *args, **kwargs: calls.append(1) or
                        estimate_blocks(*args, **kwargs))
    lean = attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[-1], segment_layers=2)
    assert len(calls) == 2 * model.cfg.n_layers
    torch.testing.assert_close(lean.head_out, plain.head_out, atol=1e-6, rtol=1e-5)
    assert lean.head_out.abs().max() > 0


def test_peak_memory_is_linear_in_T_and_within_the_benchmark_estimate(monkeypatch):
    """The whole call's peak (both forwards and the backward), in residual copies: the same at two
    lengths, and within ``benchmarks/circuits.py``'s estimate ``2 n_segments + 2 k + 8.6`` (6 layers,
    segments of 2: 18.6; measured 17.5, at a block's MLP backward). Storing every layer's corrupted hook_z and block input instead would need
    2 x 6 + 8.6 (the earlier algorithm), and fp32 products over the whole sequence (before they were
    chunked like the MLP) 21.4: the bound catches both."""
    from tests.tl.test_checkpointing import LiveBytes, memory_model

    def peak(seq_len: int) -> float:
        model, tokens = memory_model(monkeypatch, seq_len, n_layers=6)
        recorder = LiveBytes()
        with recorder:
            attribution_patching(model, tokens, tokens.flip(-1), metric, positions=[-1], segment_layers=2)
        return recorder.peak / (seq_len * 192 * 2)

    short, long = peak(512), peak(1024)
    assert abs(long - short) <= 0.5
    assert long <= 2 * 3 + 2 * 2 + 8.6


def test_products_reduced_in_chunks_that_do_not_divide_the_sequence_change_nothing():
    """``mlp_chunk_tokens`` (positions reduced at a time) of 30 for 96 tokens: the same estimates as
    one chunk (a position lost or counted twice at a chunk boundary shows here). The metric reads
    every position, so every position after the corruption has a gradient and a difference."""
    def every_position(logits):
        return (logits[0, :, 3] - logits[0, :, 8]).sum()

    model, _ = three_layers(3)
    whole = attribution_patching(model, CLEAN, CORRUPTED, every_position, spans=SPANS)
    model.mlp_chunk_tokens = 30
    chunked = attribution_patching(model, CLEAN, CORRUPTED, every_position, spans=SPANS)
    torch.testing.assert_close(chunked.head_out, whole.head_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked.resid_pre, whole.resid_pre, atol=1e-6, rtol=1e-5)
    assert whole.head_out.abs().max() > 1e-4


@pytest.mark.parametrize("segment_layers, expected_reruns", [(1, [[3], [2], [1], [0]]), (3, [[3], [0, 1, 2]]),
                                                             ("sqrt", [[2, 3], [0, 1]])])
def test_segment_layers_and_offload_reach_both_runs(monkeypatch, segment_layers, expected_reruns):
    """The corrupted run is recomputed by segments of ``segment_layers`` blocks (last first), kept in
    host memory with ``offload_activations``; the clean run's checkpointing gets ``segment_layers``
    and ``offload``; the estimates equal the plain backward's. (On the CPU offloading moves nothing,
    so the settings are observed where they are handed on.)"""
    import sparse_lens.analysis.attribution_patching as module

    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=4), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    plain = attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[-1], checkpoint=False)
    reruns, checkpoints = [], []
    rerun, checkpoint_blocks = module._Runs.corrupted_segment, module.checkpoint_blocks
    monkeypatch.setattr(module._Runs, "corrupted_segment",
                        lambda self, layers, names: reruns.append((list(layers), self.offload)) or rerun(self, layers, names))
    monkeypatch.setattr(module, "checkpoint_blocks",
                        lambda model, **kwargs: checkpoints.append(kwargs) or checkpoint_blocks(model, **kwargs))
    lean = attribution_patching(model, CLEAN, CORRUPTED, metric, positions=[-1], offload=True, offload_activations=True,
                                segment_layers=segment_layers)
    assert reruns == [(layers, True) for layers in expected_reruns]
    assert checkpoints == [dict(offload=True, segment_layers=segment_layers)]
    torch.testing.assert_close(lean.head_out, plain.head_out, atol=1e-6, rtol=1e-5)
    assert plain.head_out.abs().max() > 1e-4
