"""The kernel modules' old paths (one release): each warns and forwards to the module named for
what it holds."""

import importlib

import pytest

MOVED = {"search_ref": "search", "oneshot_ref": "oneshot", "rescore_ref": "rescore", "estimator_ref": "stream",
         "estimator_triton": "stream_triton", "sparse_attention_ref": "sparse_attention", "dense_ref": "dense"}
A_NAME = {"search": "hierarchical_search", "oneshot": "oneshot_pooled_estimate", "rescore": "rescored_estimate",
          "stream": "stream_estimate", "stream_triton": "stream_estimate_triton",
          "sparse_attention": "block_sparse_attention", "dense": "dense_attention"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_kernel_path_warns_and_forwards(old):
    new = importlib.import_module(f"sparse_lens.kernels.{MOVED[old]}")
    shim = importlib.import_module(f"sparse_lens.kernels.{old}")
    name = A_NAME[MOVED[old]]
    with pytest.warns(DeprecationWarning, match=f"kernels.{MOVED[old]}.{name}"):
        assert getattr(shim, name) is getattr(new, name)
    with pytest.raises(AttributeError):
        shim.no_such_name  # noqa: B018
