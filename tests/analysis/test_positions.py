"""analysis/positions.kept_positions: the one check of every tool's ``positions=`` (negative
positions count from the end, as in Python), and every tool raising its named error for positions
outside the sequence."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.attribution_patching import attribution_patching
from sparse_lens.analysis.interventions import block_attribution, suppress_span
from sparse_lens.analysis.path_patching import path_patch, path_patch_cached
from sparse_lens.analysis.positions import kept_positions
from sparse_lens.analysis.span_patching import span_patch
from sparse_lens.errors import InvalidPositionsError
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ = 48
TOKENS = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(3))


def metric(logits):
    return logits[0, -1, 5]


def test_negative_positions_count_from_the_end():
    assert kept_positions([0, -1, -SEQ + 5, SEQ - 2], SEQ).tolist() == [0, SEQ - 1, 5, SEQ - 2]
    assert kept_positions(torch.tensor([-3]), SEQ).tolist() == [SEQ - 3]
    assert kept_positions(None, SEQ) is None


@pytest.mark.parametrize("positions", [[SEQ], [-SEQ - 1], [0, SEQ + 5]])
def test_positions_outside_the_sequence_are_refused(positions):
    with pytest.raises(InvalidPositionsError, match="outside"):
        kept_positions(positions, SEQ)


@pytest.mark.parametrize("positions", [[], [1.0], [True], [[1, 2]], [3, 3], [3, -SEQ + 3]])
def test_empty_non_integer_or_repeated_positions_are_refused(positions):
    with pytest.raises(InvalidPositionsError):
        kept_positions(positions, SEQ)


def test_ascending_counts_negative_positions_from_the_start_first():
    assert kept_positions([10, -1], SEQ, ascending=True).tolist() == [10, SEQ - 1]
    for order in ([-1, 10], [20, 10]):
        assert kept_positions(order, SEQ).tolist() == [p % SEQ for p in order]  # any order without ascending
        with pytest.raises(InvalidPositionsError, match="ascending"):
            kept_positions(order, SEQ, ascending=True)


@pytest.fixture(scope="module")
def model():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    return sparse


TOOLS = {
    "fidelity": lambda model, positions: sl.fidelity(model, TOKENS, positions=positions),
    "path_patch": lambda model, positions: path_patch(model, TOKENS, TOKENS.flip(-1), [(0, 1)], [(1, 0)], metric,
                                                      positions=positions),
    "path_patch_cached": lambda model, positions: path_patch_cached(model, TOKENS, TOKENS.flip(-1), [(0, 1)],
                                                                    [(1, 0)], metric, positions=positions),
    "attribution_patching": lambda model, positions: attribution_patching(model, TOKENS, TOKENS.flip(-1), metric,
                                                                          positions=positions),
    "span_patch": lambda model, positions: span_patch(model, TOKENS, TOKENS.flip(-1), metric, [(0, 16)],
                                                      positions=positions, progress=False),
    "block_attribution": lambda model, positions: block_attribution(model, TOKENS, metric, positions=positions),
    "suppress_span": lambda model, positions: suppress_span(model, TOKENS, (16, 32), positions=positions),
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("positions", [[SEQ], [-SEQ - 1]])
def test_every_tool_refuses_positions_outside_the_sequence_with_the_same_error(model, tool, positions):
    with pytest.raises(InvalidPositionsError, match="outside"):
        TOOLS[tool](model, positions)
