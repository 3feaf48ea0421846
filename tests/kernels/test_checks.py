"""The shared input predicates of sparse_lens.kernels.checks."""

import numpy as np
import pytest
import torch

from sparse_lens.kernels.checks import is_int_at_least


@pytest.mark.parametrize("minimum", [0, 1])
def test_is_int_at_least_takes_whole_numbers_from_the_minimum(minimum: int) -> None:
    assert is_int_at_least(minimum, minimum)
    assert is_int_at_least(minimum + 7, minimum)
    assert not is_int_at_least(minimum - 1, minimum)


def test_is_int_at_least_zero_versus_one() -> None:
    assert is_int_at_least(0, 0)
    assert not is_int_at_least(0, 1)


@pytest.mark.parametrize("value", [True, False])
def test_is_int_at_least_rejects_bools(value: bool) -> None:
    # True is an int subclass and would otherwise pass as 1 (and False as 0)
    assert not is_int_at_least(value, 0)


@pytest.mark.parametrize("value", [2.0, 1.5, "2", None, np.int64(2), torch.tensor(2)])
def test_is_int_at_least_rejects_non_ints(value: object) -> None:
    # exactly the set every call site accepted before: Python ints only
    assert not is_int_at_least(value, 0)
