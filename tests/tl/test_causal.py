"""The sparse model is causal with causal_selection: changing token p + 1 leaves every logit at <= p unchanged."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels import ESTIMATORS
from tests.conftest import tiny_llama_config

SEQ = 128
POSITIONS = (37, 64, 90, 111)  # inside query blocks 2, 4, 5, 6 (16 tokens each)


@pytest.fixture(scope="module")
def model():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1, min_blocks=2,
                             top_p=0.7, representative_keys=4, backend="reference")
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(num_hidden_layers=3), stream)


def token_batch() -> torch.Tensor:
    """Row 0: random tokens; row i: the same with only token POSITIONS[i - 1] + 1 changed."""
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0)).repeat(1 + len(POSITIONS), 1)
    for row, position in enumerate(POSITIONS, start=1):
        tokens[row, position + 1] = (tokens[0, position + 1] + 37) % 90
    return tokens


def largest_change_before_the_edit(model, **settings) -> list[float]:
    """Per edited position p: the largest |logit change| at positions <= p."""
    with torch.no_grad(), model.stream_settings(**settings):
        logits = model(token_batch())
    return [float((logits[row, : p + 1] - logits[0, : p + 1]).abs().max()) for row, p in enumerate(POSITIONS, start=1)]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_changing_a_token_leaves_earlier_logits_unchanged(model, estimator):
    changes = largest_change_before_the_edit(model, estimator=estimator, causal_selection=True)
    assert max(changes) <= 1e-5, dict(zip(POSITIONS, changes))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_check_catches_the_old_selection(model, estimator):
    """Without causal selection every estimator lets token p + 1 steer what p reads."""
    changes = largest_change_before_the_edit(model, estimator=estimator, causal_selection=False)
    assert max(changes) > 1e-3, dict(zip(POSITIONS, changes))


def test_top_k_too_small_for_the_band_is_a_config_error():
    with pytest.raises(sl.InvalidConfigError, match="causal_selection"):
        sl.StreamConfig(query_block=64, key_block=16, top_k=4, sink_blocks=0, local_blocks=4)  # nothing left to choose
    sl.StreamConfig(query_block=64, key_block=16, top_k=4, sink_blocks=0, local_blocks=4, causal_selection=False)
    assert sl.StreamConfig(query_block=64, key_block=16, top_k=5, sink_blocks=1, local_blocks=4).estimator_kwargs()["causal"]
