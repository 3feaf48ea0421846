"""benchmarks/estimators.py's --dense-cache is fidelity.py's (``load_dense_timed``): a reloaded trace
keeps every DenseTrace field (window, soft-cap, sinks, model fingerprint) and the dense run's seconds."""

import dataclasses

import torch

import benchmarks.estimators as estimators
import benchmarks.fidelity as fidelity
from sparse_lens.analysis.fidelity_metrics import DenseTrace
from tests.benchmarks.test_fidelity import windowed_model


def test_the_estimators_dense_cache_is_fidelitys_and_keeps_every_field(tmp_path):
    assert estimators.load_dense_timed is fidelity.load_dense_timed  # one helper, not a copy
    model = windowed_model(0)
    tokens = torch.randint(0, 101, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "dense.pt"
    fresh, seconds = estimators.load_dense_timed(model, tokens, cache)
    reloaded, reloaded_seconds = estimators.load_dense_timed(model, tokens, cache)
    assert reloaded_seconds == seconds > 0  # the dense run's time, saved with it
    assert reloaded.window == [16, None] and reloaded.softcap == [2.0, 2.0] and reloaded.model is not None
    for field in dataclasses.fields(DenseTrace):
        assert repr(getattr(reloaded, field.name)) == repr(getattr(fresh, field.name)), field.name
