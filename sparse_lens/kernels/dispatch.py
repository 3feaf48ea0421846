"""Choose the implementation of each kernel: Triton on CUDA tensors, the torch reference elsewhere.

``backend="auto"`` picks Triton for CUDA tensors whose block sizes it supports (powers of two
>= 16) and the torch reference otherwise; ``"triton"`` forces Triton (on the CPU that needs
``TRITON_INTERPRET=1``), ``"reference"`` forces the reference. ``StreamConfig.backend`` carries
the choice down from the model. Triton modules are imported on first use.
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.estimator_ref import stream_estimate as stream_estimate_reference
from sparse_lens.kernels.sparse_attention_ref import block_sparse_attention as block_sparse_attention_reference

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
TRITON_MIN_BLOCK = 16


def use_triton(backend: Backend, tensor: Tensor, query_block: int, key_block: int) -> bool:
    """Whether ``backend`` resolves to Triton for this tensor and these block sizes."""
    if backend not in BACKENDS:
        raise InvalidConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend != "auto":
        return backend == "triton"
    return tensor.is_cuda and all(
        size >= TRITON_MIN_BLOCK and size & (size - 1) == 0 for size in (query_block, key_block)
    )


def stream_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    representative_keys: int = 8,
    backend: Backend = "auto",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """The Stream estimator (see ``estimator_ref``), on the chosen backend."""
    settings = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink_blocks,
                    local_blocks=local_blocks, representative_keys=representative_keys)
    if use_triton(backend, query, query_block, key_block):
        from sparse_lens.kernels.estimator_triton import stream_estimate_triton

        return stream_estimate_triton(query, key, **settings)
    return stream_estimate_reference(query, key, **settings)


def block_sparse_attention(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    block_gate: Float[Tensor, "batch q_head n_query_blocks top_k"] | None = None,
    backend: Backend = "auto",
) -> tuple[
    Float[Tensor, "batch q_head seq d_value"],
    Float[Tensor, "batch q_head seq"],
    Float[Tensor, "batch q_head n_query_blocks top_k"],
]:
    """Block-sparse attention (see ``sparse_attention_ref``), on the chosen backend."""
    settings = dict(query_block=query_block, key_block=key_block, scale=scale, block_gate=block_gate)
    if use_triton(backend, query, query_block, key_block):
        from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton

        return block_sparse_attention_triton(query, key, value, block_indices, **settings)
    return block_sparse_attention_reference(query, key, value, block_indices, **settings)
