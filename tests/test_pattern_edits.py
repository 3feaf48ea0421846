"""normalize_block_indices and gate_from_mass_edit against hand-made rows (brute-force small cases)."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.pattern_edits import gate_from_mass_edit, normalize_block_indices

GEOMETRY = dict(seq_len=64, query_block=32, key_block=16)  # rows: queries 0..31, 32..63; key blocks 0..3


def _rows(*rows):
    return torch.tensor([[list(rows)]])  # [batch 1, head 1, rows, top_k]


def test_rows_are_sorted_with_unused_slots_last_and_the_gate_follows():
    indices, gate = normalize_block_indices(
        _rows([1, -1, 0], [-1, 3, 2]), block_gate=torch.tensor([[[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]]]), **GEOMETRY)
    assert indices.tolist() == [[[[0, 1, -1], [2, 3, -1]]]]
    torch.testing.assert_close(gate, torch.tensor([[[[0.3, 0.1, 0.2], [0.6, 0.5, 0.4]]]]))


@pytest.mark.parametrize("rows,message", [
    (([0, 0, 1], [0, 2, 3]), "listed twice"),
    (([0, 1, -1], [0, 4, -1]), "out of range"),
    (([0, 1, -2], [0, 3, -1]), "out of range"),
    (([0, 2, -1], [0, 3, -1]), "not causal"),  # row 0 sees key blocks 0..1
    (([0, 1, -1], [3, -1, -1]), "sees no kept key"),  # query 32 is in key block 2
    (([0, 1, -1], [-1, -1, -1]), "sees no kept key"),
])
def test_invalid_rows_raise_a_named_error(rows, message):
    with pytest.raises(sl.InvalidPatternError, match=message):
        normalize_block_indices(_rows(*rows), **GEOMETRY)


def test_the_block_holding_a_rows_first_query_is_enough():
    indices, _ = normalize_block_indices(_rows([0, -1, -1], [2, -1, -1]), **GEOMETRY)  # key block 2 starts at 32
    assert indices[0, 0, :, 0].tolist() == [0, 2]
    with pytest.raises(sl.InvalidPatternError, match="query 0 sees no kept key"):
        normalize_block_indices(_rows([1, -1, -1], [2, -1, -1]), **GEOMETRY)  # block 1 starts after query 0


def test_float_indices_are_refused():
    with pytest.raises(sl.InvalidPatternError, match="integer"):
        normalize_block_indices(_rows([0.0, 1.0]).float(), **GEOMETRY)


def test_mass_edit_becomes_the_ratio_gate():
    original = torch.tensor([[[[0.6, 0.4, 0.0]]]])
    gate = gate_from_mass_edit(original, torch.tensor([[[[0.3, 0.4, 0.0]]]]))
    torch.testing.assert_close(gate, torch.tensor([[[[0.5, 1.0, 1.0]]]]))
    with pytest.raises(sl.InvalidPatternError, match="was 0"):
        gate_from_mass_edit(original, torch.tensor([[[[0.3, 0.4, 0.1]]]]))
    with pytest.raises(sl.InvalidPatternError, match="finite"):
        gate_from_mass_edit(original, torch.tensor([[[[-0.3, 0.4, 0.0]]]]))
