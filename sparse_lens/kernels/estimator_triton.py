"""Deprecated path (one release): the Stream estimator's Triton kernel moved to :mod:`sparse_lens.kernels.stream_triton`;
importing a name from here warns and forwards."""

from __future__ import annotations

from sparse_lens.deprecation import forward_to
from sparse_lens.kernels import stream_triton as _moved

__getattr__ = forward_to(_moved, "sparse_lens.kernels.estimator_triton")
