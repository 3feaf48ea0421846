"""What a BlockSparsePattern refuses, and how: torch functions other than ``torch.stack`` and a
query selection that is not one contiguous run of blocks raise ``DensePatternRequiredError``
saying what to do instead (rather than a bare dispatch ``TypeError`` or a silently widened run)."""

import copy
import pickle

import pytest
import torch

import sparse_lens as sl
from tests.test_pattern import make_pattern


@pytest.mark.parametrize("call", [torch.mean, torch.sum, torch.exp, lambda p: torch.cat([p, p]),
                                  lambda p: torch.nn.functional.softmax(p, -1)])
def test_torch_functions_other_than_stack_raise_a_named_error(call):
    pattern = make_pattern()
    with pytest.raises(sl.DensePatternRequiredError, match="does not apply to a BlockSparsePattern") as error:
        call(pattern)
    assert "pattern.block_mass" in str(error.value)
    assert isinstance(error.value, TypeError)  # still what a caller catching TypeError expects
    assert isinstance(torch.stack([pattern, pattern]), sl.BlockSparsePatternStack)  # the one that applies


@pytest.mark.parametrize("call", [lambda p: p.mean(), lambda p: p.sum(-1), lambda p: p.softmax(-1),
                                  lambda p: p.numpy(), lambda p: p.dtype])
def test_tensor_methods_raise_the_named_error_of_the_torch_functions(call):
    """``pattern.mean()`` as ``torch.mean(pattern)`` (it was a bare AttributeError)."""
    with pytest.raises(sl.DensePatternRequiredError, match="does not apply to a BlockSparsePattern") as error:
        call(make_pattern())
    assert "pattern.block_mass." in str(error.value)
    assert isinstance(error.value, sl.DensePatternMethodError) and isinstance(error.value, AttributeError)


@pytest.mark.parametrize("cast,dtype", [("float", "torch.float32"), ("double", "torch.float64"),
                                        ("half", "torch.float16"), ("bfloat16", "torch.bfloat16")])
def test_dtype_casts_raise_the_named_error_saying_to_use_to(cast, dtype):
    pattern = make_pattern()
    with pytest.raises(sl.DensePatternMethodError, match=rf"pattern\.to\({dtype}\)"):
        getattr(pattern, cast)()
    assert not hasattr(pattern, cast)
    cast_by_to = pattern.to(getattr(torch, dtype.removeprefix("torch.")))
    assert cast_by_to.block_mass.dtype == getattr(torch.ones(1), cast)().dtype


def test_probing_a_pattern_for_attributes_still_works():
    pattern = make_pattern()
    assert not hasattr(pattern, "mean") and getattr(pattern, "dtype", None) is None  # AttributeError underneath
    with pytest.raises(AttributeError) as error:
        pattern.no_such_name
    assert not isinstance(error.value, sl.DensePatternRequiredError)  # not a tensor name: the plain error
    for copied in (copy.deepcopy(pattern), pickle.loads(pickle.dumps(pattern))):
        assert torch.equal(copied.block_indices, pattern.block_indices) and copied.seq_len == pattern.seq_len


def test_query_positions_in_blocks_that_touch_keep_exactly_those_blocks():
    pattern = make_pattern(seq=100, block=16)  # 7 query blocks
    picked = pattern[:, :, [17, 40, 20]]  # blocks 1 and 2
    assert (picked.first_query_block, picked.n_query_blocks) == (1, 2)
    assert torch.equal(picked.block_indices, pattern.block_indices[:, :, 1:3])
    assert pattern[:, :, 33].n_query_blocks == 1 and pattern[:, :, 16:48:2].n_query_blocks == 2


@pytest.mark.parametrize("selection", [[5, 90], [0, 33, 99], slice(0, 100, 40), torch.tensor([3, 70])])
def test_query_positions_in_blocks_apart_are_refused(selection):
    pattern = make_pattern(seq=100, block=16)
    with pytest.raises(sl.DensePatternRequiredError, match="not one contiguous run"):
        pattern[:, :, selection]


# ----- indices torch would refuse or read otherwise (each once picked a wrong block silently) ------
@pytest.mark.parametrize("selection", [100, -101, [3, 100], 1.5, torch.tensor([2.0])])
def test_query_positions_out_of_range_or_not_integers_raise(selection):
    pattern = make_pattern(seq=100, block=16)  # position 100 wrapped to 0, 1.5 was read as 1
    with pytest.raises(IndexError):
        pattern[:, :, selection]


def test_bool_masks_select_what_torch_selects():
    pattern = make_pattern(batch=3, seq=100, block=16)
    rows = pattern[torch.tensor([True, False, True])]  # was read as rows [1, 0, 1]
    assert torch.equal(rows.block_indices, pattern.block_indices[[0, 2]])
    positions = torch.zeros(100, dtype=torch.bool)
    positions[33:40] = True  # inside query block 2
    assert pattern[:, :, positions].first_query_block == 2 and pattern[:, :, positions].n_query_blocks == 1
    for bad in (True, torch.tensor([True, False])):  # a single bool; a mask of the wrong length
        with pytest.raises(IndexError):
            pattern[bad]
    with pytest.raises(IndexError):
        pattern[:, :, []]


@pytest.mark.parametrize("call", [lambda s: s.mean(), lambda s: s.sum(-1), lambda s: s.softmax(-1), lambda s: s.numpy(),
                                  torch.mean, lambda s: torch.einsum("lbhqk->lbhq", s)])
def test_a_pattern_stack_refuses_tensor_methods_and_torch_functions_by_name(call):
    """``cache.stack_activation("pattern").mean()`` as ``pattern.mean()``: the named error (it was a
    bare AttributeError, ``torch.mean(stack)`` a bare 'must be Tensor' TypeError)."""
    stack = torch.stack([make_pattern(), make_pattern()])
    with pytest.raises(sl.DensePatternRequiredError, match="does not apply to a BlockSparsePatternStack") as error:
        call(stack)
    assert "stack.block_mass" in str(error.value)
    assert isinstance(error.value, (TypeError, AttributeError))  # what callers catching the old errors expect


def test_probing_a_pattern_stack_still_works():
    stack = torch.stack([make_pattern(), make_pattern()])
    assert not hasattr(stack, "mean") and getattr(stack, "dtype", None) is None
    with pytest.raises(AttributeError) as error:
        stack.no_such_name
    assert not isinstance(error.value, sl.DensePatternRequiredError)
    for copied in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        assert torch.equal(copied.block_indices, stack.block_indices) and len(copied) == 2
    assert stack.shape[0] == 2 and stack[1].seq_len == stack[0].seq_len and stack.pruned_fraction().shape == (2,)
