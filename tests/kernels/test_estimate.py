"""Every estimator: the output contract, GQA, bad input, the registry and the estimate_blocks entry point."""

import dataclasses
import sys
from collections import Counter

import pytest
import torch

from sparse_lens.config import ESTIMATORS as CONFIG_ESTIMATORS
from sparse_lens.config import TracingConfig
from sparse_lens.errors import InvalidConfigError, ShapeError
from sparse_lens.kernels import oneshot, registry, rescore, search
from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.kernels.estimate import ESTIMATORS, estimate_blocks
from sparse_lens.kernels.stream import stream_estimate
from sparse_lens.kernels.registry import AdaptiveSettings, AntidiagonalSettings, RescoredSettings, StreamSettings
from tests.kernels.estimator_cases import check_rows, random_qk

FIXED_K = {
    "pooled": search.pooled_estimate,
    "pooled_strided_meanq": lambda q, k, **kw: search.pooled_estimate(q, k, query_stride=4, mean_query=True, **kw),
    "pooled_meanq": lambda q, k, **kw: search.pooled_estimate(q, k, query_stride=0, mean_query=True, **kw),
    "bounds": search.bounds_estimate,
    "oneshot_pooled": oneshot.oneshot_pooled_estimate,
    "antidiagonal": oneshot.antidiagonal_estimate,
    "antidiagonal_softmax": lambda q, k, **kw: oneshot.antidiagonal_estimate(q, k, normalize="softmax", **kw),
    "rescored": rescore.rescored_estimate,
    "rescored_pooled": lambda q, k, **kw: rescore.rescored_estimate(q, k, search="pooled", beam=2, **kw),
}


@pytest.mark.parametrize("name", list(FIXED_K))
@pytest.mark.parametrize("seq,query_block,key_block", [(130, 16, 16), (100, 16, 8), (77, 8, 16)])
def test_fixed_budget_contract(name, seq, query_block, key_block):
    query, key = random_qk(batch=2, q_heads=6, kv_heads=3, seq=seq)
    top_k, sink, local = 5, 1, 2
    chosen = FIXED_K[name](query, key, query_block=query_block, key_block=key_block, top_k=top_k,
                           sink_blocks=sink, local_blocks=local)
    assert chosen.shape[:2] == (2, 6)

    def exact_count(n_visible, used):
        assert len(used) == min(top_k, n_visible)

    check_rows(chosen, seq, query_block, key_block, top_k, sink, local, exact_count)


@pytest.mark.parametrize("name", ["pooled", "bounds", "oneshot_pooled", "antidiagonal", "rescored"])
def test_gqa_query_heads_sharing_a_key_head_search_independently(name):
    query, key = random_qk(q_heads=4, kv_heads=1, seq=256, seed=1)
    query[:, 1] = -query[:, 0]
    query[:, 2] = query[:, 0]
    chosen = FIXED_K[name](query, key, query_block=16, key_block=16, top_k=4, sink_blocks=0, local_blocks=1)
    assert not torch.equal(chosen[:, 0], chosen[:, 1])
    assert torch.equal(chosen[:, 0], chosen[:, 2])


def test_gqa_reads_the_shared_key_head():
    query, key = random_qk(q_heads=4, kv_heads=2, seq=192, seed=4)
    kwargs = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    for name in ("pooled", "bounds", "antidiagonal", "rescored"):
        together = FIXED_K[name](query, key, **kwargs)
        # query head 3 reads key head 1: alone with that key head it must choose the same blocks
        alone = FIXED_K[name](query[:, 3:4], key[:, 1:2], **kwargs)
        assert torch.equal(together[:, 3:4], alone), name


def test_rejects_bad_inputs():
    query, key = random_qk(q_heads=3, kv_heads=2)
    with pytest.raises(ShapeError):
        search.pooled_estimate(query, key, query_block=16, key_block=16, top_k=4)
    query, key = random_qk()
    with pytest.raises(ValueError):
        search.bounds_estimate(query, key, query_block=16, key_block=16, top_k=2, sink_blocks=2, local_blocks=1)
    with pytest.raises(ValueError):
        oneshot.oneshot_pooled_estimate(query, key, query_block=16, key_block=24, top_k=4)


# ----- estimate_blocks: one call for every estimator -------------------------------------------
@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimate_blocks_runs_every_named_estimator_with_the_contract(name):
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=150, seed=16)
    top_k, sink, local = 6, 1, 1
    settings = AdaptiveSettings(min_blocks=3, top_p=0.8) if name == "adaptive" else None
    chosen = estimate_blocks(query, key, estimator=name, query_block=16, key_block=16, top_k=top_k,
                             sink_blocks=sink, local_blocks=local, settings=settings, backend="reference")

    def count(n_visible, used):
        if name == "adaptive":
            assert min(3, n_visible) <= len(used) <= min(top_k, n_visible)
        else:
            assert len(used) == min(top_k, n_visible)

    check_rows(chosen, 150, 16, 16, top_k, sink, local, count)


def test_estimate_blocks_passes_each_estimator_its_own_settings():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=256, seed=17)
    budget = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    geometry = BlockGeometry(**budget)
    assert torch.equal(estimate_blocks(query, key, geometry, estimator="stream", settings=StreamSettings(4)),
                       stream_estimate(query, key, representative_keys=4, **budget))
    assert torch.equal(estimate_blocks(query, key, estimator="antidiagonal", settings=AntidiagonalSettings(4), **budget),
                       oneshot.antidiagonal_estimate(query, key, stride=4, **budget))
    # rescored, composed by hand from its parts: a bounds search with beam 2 x the searched slots,
    # exact masses on every 2nd query, sink + local + the heaviest
    rescored = estimate_blocks(query, key, geometry, estimator="rescored", scale=0.3, backend="reference",
                               settings=RescoredSettings(beam=2, rescore_query_stride=2, rescore_search="bounds"))
    candidates = search.bounds_estimate(query, key, **{**budget, "top_k": 2 + 2 * 3})
    mass = rescore.candidate_block_mass(query, key, candidates, query_block=16, key_block=16, sink_blocks=1,
                                            local_blocks=1, scale=0.3, query_stride=2)
    assert torch.equal(rescored, rescore.keep_heaviest(candidates, mass, seq_len=256, **budget))
    # adaptive, by hand: Stream's search with top_k candidates, exact masses, then top-p
    adaptive = estimate_blocks(query, key, geometry, estimator="adaptive", backend="reference",
                               settings=AdaptiveSettings(top_p=0.6, min_blocks=3, representative_keys=4))
    candidates = stream_estimate(query, key, representative_keys=4, **budget)
    mass = rescore.candidate_block_mass(query, key, candidates, query_block=16, key_block=16, sink_blocks=1,
                                            local_blocks=1)
    always_keep = rescore.fixed_slot_mask(candidates, seq_len=256, query_block=16, key_block=16, sink_blocks=1,
                                              local_blocks=1)
    assert torch.equal(adaptive, rescore.select_top_p(candidates, mass, always_keep, p=0.6, min_blocks=3))
    assert not torch.equal(adaptive, estimate_blocks(query, key, geometry, estimator="adaptive", backend="reference",
                                                     settings=AdaptiveSettings(top_p=0.99, min_blocks=3)))


def test_flat_settings_still_work_with_a_deprecation_warning():
    query, key = random_qk(batch=1, q_heads=2, kv_heads=1, seq=256, seed=17)
    budget = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    with pytest.warns(DeprecationWarning, match="settings=RescoredSettings"):
        flat = estimate_blocks(query, key, estimator="rescored", beam=2, rescore_query_stride=2, top_p=0.5, **budget)
    assert torch.equal(flat, estimate_blocks(query, key, estimator="rescored", **budget,
                                             settings=RescoredSettings(beam=2, rescore_query_stride=2)))
    with pytest.raises(TypeError, match="unknown estimator setting"):
        estimate_blocks(query, key, estimator="rescored", bream=2, **budget)


def test_estimate_blocks_rejects_unknown_names_and_mismatched_settings():
    query, key = random_qk()
    budget = dict(query_block=16, key_block=16, top_k=4)
    with pytest.raises(InvalidConfigError, match="estimator must be one of"):
        estimate_blocks(query, key, estimator="no_such_estimator", **budget)
    with pytest.raises(InvalidConfigError, match="takes RescoredSettings"):
        estimate_blocks(query, key, estimator="rescored", settings=AdaptiveSettings(), **budget)
    with pytest.raises(InvalidConfigError, match="min_blocks"):
        estimate_blocks(query, key, estimator="adaptive", settings=AdaptiveSettings(min_blocks=5), **budget)
    with pytest.raises(InvalidConfigError, match="top_k"):
        estimate_blocks(query, key, query_block=16, key_block=16, top_k=0)
    with pytest.raises(TypeError, match="not both"):
        estimate_blocks(query, key, BlockGeometry(16, 16, 4), top_k=4)


def test_the_registry_is_the_one_list_of_estimators():
    assert ESTIMATORS == tuple(registry.REGISTRY) and CONFIG_ESTIMATORS is ESTIMATORS
    assert "oracle" in ESTIMATORS and registry.DEFAULT_ESTIMATOR == TracingConfig().estimator
    for entry in registry.REGISTRY.values():
        # plain frozen dataclasses with defaults and a help line per field (command-line flags are built from them)
        assert dataclasses.is_dataclass(entry.settings) and entry.settings.__dataclass_params__.frozen
        for field in dataclasses.fields(entry.settings):
            assert field.default is not dataclasses.MISSING and field.metadata.get("help"), (entry.name, field.name)
    kwargs = TracingConfig(estimator="adaptive", top_k=8,
                           estimator_settings=AdaptiveSettings(min_blocks=2)).estimator_kwargs()
    assert kwargs["estimator"] == "adaptive" and kwargs["settings"].min_blocks == 2
    assert kwargs["geometry"] == BlockGeometry(64, 64, 8, 1, 1)


def checks_entered(run) -> Counter:
    """Calls of the ``check_*`` functions of sparse_lens/kernels/checks.py while ``run()`` runs (not
    its predicates, e.g. ``is_int_at_least``, which the settings' own validation calls)."""
    entered = Counter()

    def profile(frame, event, arg):
        if (event == "call" and frame.f_code.co_name.startswith("check_")
                and frame.f_code.co_filename.replace("\\", "/").endswith("sparse_lens/kernels/checks.py")):
            entered[frame.f_code.co_name] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return entered


@pytest.mark.parametrize("name", [name for name in ESTIMATORS if name != "oracle"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_estimate_blocks_call_checks_its_inputs_once(name, causal):
    # Before the registry, a rescored call entered checks.py twice on the torch path (4 times on
    # Triton); the inputs are now checked at the boundary and the geometry passed inward unchecked.
    query, key = random_qk(batch=1, q_heads=4, kv_heads=2, seq=150, seed=16)
    entered = checks_entered(lambda: estimate_blocks(query, key, estimator=name, query_block=16, key_block=16, top_k=6,
                                                     sink_blocks=1, local_blocks=1, backend="reference", causal=causal))
    assert entered == Counter({"check_attention_inputs": 1}), entered


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1


@pytest.mark.parametrize("estimator", ["rescored", "adaptive"])
def test_rescored_and_adaptive_on_the_triton_kernels_equal_the_reference(estimator):
    # Triton path: Stream's kernel for the candidates, the attention kernel's block_mass for their mass.
    query, key = (tensor.to(DEVICE) for tensor in random_qk(batch=1, q_heads=4, kv_heads=2, seq=200, d=16, seed=18))
    own = RescoredSettings(beam=2) if estimator == "rescored" else AdaptiveSettings(min_blocks=3, top_p=0.8)
    settings = dict(estimator=estimator, query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1,
                    settings=own, scale=0.5)
    on_triton = estimate_blocks(query * 2, key, backend="triton", **settings)
    reference = estimate_blocks(query * 2, key, backend="reference", **settings)
    assert torch.equal(on_triton, reference)


@pytest.mark.parametrize("name", ["stream", "rescored", "adaptive"])
def test_the_triton_path_checks_its_inputs_once_too(name):
    # The Triton entry points behind the boundary skip the tensor checks (stream_estimate_triton_unchecked,
    # rescore_*_triton(inputs_checked=True)); before, a rescored call entered checks.py 5 times here.
    query, key = (tensor.to(DEVICE) for tensor in random_qk(batch=1, q_heads=4, kv_heads=2, seq=96, d=16, seed=16))
    entered = checks_entered(lambda: estimate_blocks(query, key, estimator=name, query_block=16, key_block=16, top_k=4,
                                                     sink_blocks=1, local_blocks=1, backend="triton"))
    assert entered == Counter({"check_attention_inputs": 1}), entered
