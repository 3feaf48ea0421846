"""Edited patterns are validated once, where they enter the model (each case of issue 9 item 5)."""

import pytest
import torch

import sparse_lens as sl
from tests.conftest import tiny_llama_config

STREAM = sl.StreamConfig(query_block=16, key_block=16, top_k=3)
TOKENS = torch.randint(0, 90, (1, 64), generator=torch.Generator().manual_seed(0))
PATTERN, INDICES = "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_block_indices"


@pytest.fixture(scope="module")
def model():
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM)


def _run(model, name, edit):
    with torch.no_grad():
        return model.run_with_hooks(TOKENS, fwd_hooks=[(name, edit)])


def _set_row(row, values):
    """A pattern hook that sets query block ``row`` of every head to ``values``."""
    def hook(pattern, hook):
        indices = pattern.block_indices.clone()
        indices[..., row, :] = torch.tensor(values)
        return pattern.with_block_indices(indices)
    return hook


def test_a_repeated_block_is_refused(model):
    with pytest.raises(sl.InvalidPatternError, match="listed twice"):
        _run(model, PATTERN, _set_row(3, [0, 0, 3]))


@pytest.mark.parametrize("block", [4, 99, -2])
def test_an_out_of_range_block_is_a_named_error(model, block):
    with pytest.raises(sl.InvalidPatternError, match="out of range"):
        _run(model, PATTERN, _set_row(3, [0, block, 3]))


def test_a_non_causal_block_is_refused(model):
    with pytest.raises(sl.InvalidPatternError, match="not causal"):
        _run(model, PATTERN, _set_row(1, [0, 1, 2]))


def test_unsorted_rows_and_holes_run_as_their_sorted_form(model):
    sorted_run = _run(model, PATTERN, _set_row(3, [0, 2, 3]))
    shuffled = _run(model, PATTERN, _set_row(3, [3, 0, 2]))
    with_hole = _run(model, INDICES, lambda x, hook: torch.where(
        torch.arange(4)[:, None] == 3, torch.tensor([-1, 3, 0]), x))  # row 3 keeps 0 and 3, -1 first
    torch.testing.assert_close(shuffled, sorted_run)
    torch.testing.assert_close(with_hole, _run(model, PATTERN, _set_row(3, [0, 3, -1])))
    assert (with_hole - sorted_run).abs().max() > 1e-5  # dropping block 2 matters: the check can fail


def test_a_gate_is_permuted_with_its_rows(model):
    def gated(flip):
        def hook(pattern, hook):
            gate = torch.where(pattern.block_indices == 0, 0.25, 1.0)  # scale the sink block only
            if flip:
                return pattern.with_block_indices(pattern.block_indices.flip(-1)).with_gate(gate.flip(-1))
            return pattern.with_gate(gate)
        return hook

    reference = _run(model, PATTERN, gated(False))
    torch.testing.assert_close(_run(model, PATTERN, gated(True)), reference)


def test_a_query_left_without_keys_is_refused():
    model = sl.HookedSparseTransformer.from_config(
        tiny_llama_config(), sl.StreamConfig(query_block=32, key_block=16, top_k=3)
    )

    def diagonal_only(pattern, hook):  # row 1 holds queries 32..63; key block 3 starts at 48
        indices = pattern.block_indices.clone()
        indices[..., 1, :] = torch.tensor([3, -1, -1])
        return pattern.with_block_indices(indices)

    with pytest.raises(sl.InvalidPatternError, match="local_blocks >= query_block // key_block"):
        _run(model, PATTERN, diagonal_only)


def test_returning_something_else_than_a_pattern_is_refused(model):
    with pytest.raises(sl.InvalidPatternError, match="must return a BlockSparsePattern"):
        _run(model, PATTERN, lambda pattern, hook: pattern.block_mass)


def test_validated_checks_without_running_the_model(model):
    with torch.no_grad():
        pattern = model.run_with_cache(TOKENS, names_filter=PATTERN)[1][PATTERN]
    assert torch.equal(pattern.validated().block_indices, pattern.block_indices)  # estimator output is valid
    with pytest.raises(sl.InvalidPatternError):
        _set_row(2, [1, 1, 2])(pattern, None).validated()
