"""Choose the implementation of each kernel: Triton on CUDA tensors, the torch reference elsewhere.

``backend="auto"`` picks Triton for CUDA tensors whose block sizes it supports (powers of two
>= 16) and the torch reference otherwise; ``"triton"`` forces Triton (on the CPU that needs
``TRITON_INTERPRET=1``), ``"reference"`` forces the reference. ``StreamConfig.backend`` carries
the choice down from the model. Triton modules are imported on first use.

The estimators' Triton launches (Stream search, bounds search, rescoring) fall back to their torch
reference, with a warning, when the compiled kernel asks for more shared memory than the GPU has
(Triton's ``OutOfResources``, raised at launch before anything is written; e.g. d_head 256 in
float32 on the H200's 227 KB): see ``_triton_or_reference`` in this module.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, TypeVar

from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.checks import check_attention_features
from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.kernels.checks import check_attention_inputs
from sparse_lens.kernels.search import bounds_estimate_unchecked as bounds_estimate_reference_unchecked
from sparse_lens.kernels.stream import stream_estimate as stream_estimate_reference
from sparse_lens.kernels.stream import stream_estimate_unchecked as stream_estimate_reference_unchecked
from sparse_lens.kernels.sparse_attention import block_sparse_attention as block_sparse_attention_reference

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
TRITON_MIN_BLOCK = 16
Result = TypeVar("Result")


def use_triton(backend: Backend, tensor: Tensor, query_block: int, key_block: int) -> bool:
    """Whether ``backend`` resolves to Triton for this tensor and these block sizes."""
    if backend not in BACKENDS:
        raise InvalidConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend != "auto":
        return backend == "triton"
    return tensor.is_cuda and all(
        size >= TRITON_MIN_BLOCK and size & (size - 1) == 0 for size in (query_block, key_block)
    )


def _triton_or_reference(triton_call: Callable[[], Result], reference_call: Callable[[], Result], what: str) -> Result:
    """``triton_call()``, or ``reference_call()`` (same contract, slower) if the Triton launch
    raises ``OutOfResources``: the compiled kernel needs more on-chip memory (shared memory,
    registers) than this GPU has. Triton raises it at launch, before the kernel writes anything,
    so nothing is half-written. Warns once per call site (Python's default filter), naming
    ``what`` (kernel and shapes) and the bytes asked vs available."""
    from triton.runtime.errors import OutOfResources

    try:
        return triton_call()
    except OutOfResources as error:
        warnings.warn(
            f"{what}: the Triton kernel needs {error.required} B of {error.name}, this GPU has "
            f"{error.limit} B; running the torch reference instead (same result, slower).",
            RuntimeWarning, stacklevel=3,
        )
        return reference_call()


def _estimator_shapes(name: str, query: Tensor, geometry: BlockGeometry, **extra: object) -> str:
    """``name`` and the sizes that set a kernel's on-chip tiles, for ``_triton_or_reference``."""
    sizes = dict(d_head=query.shape[-1], dtype=str(query.dtype).removeprefix("torch."),
                 query_block=geometry.query_block, key_block=geometry.key_block, **extra)
    return f"{name} ({', '.join(f'{key} {value}' for key, value in sizes.items())})"


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
    """The Stream estimator (see ``stream``), on the chosen backend.

    Raises ``ShapeError`` for malformed q / k and ``BlockSizeError`` / ``InvalidConfigError`` for
    a bad block budget, once, before dispatching."""
    check_attention_inputs(query, key)
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    return stream_estimate_unchecked(query, key, geometry, representative_keys=representative_keys, backend=backend)


def stream_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    representative_keys: int = 8,
    backend: Backend = "auto",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``stream_estimate`` on inputs the caller has validated (the Triton kernel still checks
    its own block-size constraints, no tensor checks). A Triton launch over the GPU's shared
    memory falls back to the reference with a warning (``_triton_or_reference``)."""
    def reference():
        return stream_estimate_reference_unchecked(query, key, geometry, representative_keys=representative_keys)

    if use_triton(backend, query, geometry.query_block, geometry.key_block):
        from sparse_lens.kernels.stream_triton import stream_estimate_triton_unchecked

        return _triton_or_reference(
            lambda: stream_estimate_triton_unchecked(query, key, representative_keys=representative_keys,
                                                     **geometry.as_kwargs()),
            reference,
            _estimator_shapes("stream_triton._stream_estimate_kernel", query, geometry, top_k=geometry.top_k,
                              branches=geometry.n_search),
        )
    return reference()


def bounds_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    query_stride: int = 1,
    backend: Backend = "auto",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """The bounds search (``search.bounds_estimate``) on validated inputs, on the chosen backend:
    on Triton ``bounds_triton`` (the kernel still checks its own block-size constraints; over the
    GPU's shared memory it falls back to the reference with a warning)."""
    def reference():
        return bounds_estimate_reference_unchecked(query, key, geometry, query_stride=query_stride)

    if use_triton(backend, query, geometry.query_block, geometry.key_block):
        from sparse_lens.kernels.bounds_triton import bounds_estimate_triton_unchecked

        return _triton_or_reference(
            lambda: bounds_estimate_triton_unchecked(query, key, geometry, query_stride=query_stride),
            reference,
            _estimator_shapes("bounds_triton._bounds_search_kernel", query, geometry, top_k=geometry.top_k,
                              branches=geometry.n_search),
        )
    return reference()


def rescore_top_k_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    geometry: BlockGeometry,
    *,
    scale: float | None = None,
    query_stride: int = 1,
    backend: Backend = "auto",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Exact candidate masses, then the sink / local blocks and the heaviest, ``geometry.top_k``
    in all (``rescore.rescore_top_k``; on Triton the fused ``rescore_top_k_triton``, or the
    reference with a warning where its launch exceeds the GPU's shared memory)."""
    from sparse_lens.kernels.rescore import rescore_top_k

    settings = dict(scale=scale, query_stride=query_stride, **geometry.as_kwargs())
    if use_triton(backend, query, geometry.query_block, geometry.key_block):
        from sparse_lens.kernels.rescore_triton import rescore_top_k_triton

        return _triton_or_reference(
            lambda: rescore_top_k_triton(query, key, candidates, inputs_checked=True, **settings),
            lambda: rescore_top_k(query, key, candidates, **settings),
            _estimator_shapes("rescore_triton._rescore_kernel (top_k)", query, geometry, top_k=geometry.top_k,
                              candidates=candidates.shape[-1]),
        )
    return rescore_top_k(query, key, candidates, **settings)


def rescore_top_p_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    geometry: BlockGeometry,
    *,
    p: float,
    min_blocks: int,
    scale: float | None = None,
    query_stride: int = 1,
    backend: Backend = "auto",
) -> Int[Tensor, "batch q_head n_query_blocks width"]:
    """Exact candidate masses, then per row the fewest heaviest reaching mass ``p`` (at least
    ``min_blocks``; ``rescore.rescore_top_p``; on Triton the fused ``rescore_top_p_triton``).
    ``geometry.top_k`` is unused: the width is the candidates'. A Triton launch over the GPU's
    shared memory falls back to the reference with a warning."""
    from sparse_lens.kernels.rescore import rescore_top_p

    settings = dict(scale=scale, query_stride=query_stride, p=p, min_blocks=min_blocks,
                    query_block=geometry.query_block, key_block=geometry.key_block,
                    sink_blocks=geometry.sink_blocks, local_blocks=geometry.local_blocks)
    if use_triton(backend, query, geometry.query_block, geometry.key_block):
        from sparse_lens.kernels.rescore_triton import rescore_top_p_triton

        return _triton_or_reference(
            lambda: rescore_top_p_triton(query, key, candidates, inputs_checked=True, **settings),
            lambda: rescore_top_p(query, key, candidates, **settings),
            _estimator_shapes("rescore_triton._rescore_kernel (top_p)", query, geometry,
                              candidates=candidates.shape[-1]),
        )
    return rescore_top_p(query, key, candidates, **settings)


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
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> tuple[
    Float[Tensor, "batch q_head seq d_value"],
    Float[Tensor, "batch q_head seq"],
    Float[Tensor, "batch q_head n_query_blocks top_k"],
]:
    """Block-sparse attention (see ``sparse_attention``, also for ``window`` / ``softcap`` /
    ``sinks``), on the chosen backend."""
    settings = dict(query_block=query_block, key_block=key_block, scale=scale, block_gate=block_gate,
                    window=window, softcap=softcap, sinks=sinks)
    if use_triton(backend, query, query_block, key_block):
        from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton

        return block_sparse_attention_triton(query, key, value, block_indices, **settings)
    return block_sparse_attention_reference(query, key, value, block_indices, **settings)


def dense_attention(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    *,
    scale: float,
    query_offset: int = 0,
    backend: Backend = "auto",
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> tuple[Float[Tensor, "batch q_head seq d_value"], Float[Tensor, "batch q_head seq"]]:
    """Exact causal attention with its lse (see ``dense``), on the chosen backend.

    Dense attention has no Triton kernel of its own: ``"auto"`` and ``"triton"`` run torch's
    fused SDPA kernel with its log-sum-exp (``dense_sdpa``: flash / cuDNN on CUDA, flash on the
    CPU) wherever SDPA has one for these tensors (prefill, fp16/bf16 on CUDA, any float on the
    CPU); ``"reference"`` and every other case run the chunked torch reference.
    SDPA's fused kernels take no sliding window, soft-cap or sinks: with any of ``window`` /
    ``softcap`` / ``sinks``, prefill where Triton applies (CUDA, or ``"triton"``) runs the
    block-sparse Triton kernel over the whole causal or window band (``dense_sdpa.dense_attention_band``,
    exact), everything else the chunked reference.
    """
    if backend not in BACKENDS:
        raise InvalidConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    from sparse_lens.kernels.dense import dense_attention as dense_attention_reference
    from sparse_lens.kernels.dense_sdpa import BAND_BLOCK, dense_attention_band, dense_attention_sdpa, fused_backend

    features = dict(window=window, softcap=softcap, sinks=sinks)
    if window is not None or softcap is not None or sinks is not None:
        if query_offset == 0 and use_triton(backend, query, BAND_BLOCK, BAND_BLOCK):
            return dense_attention_band(query, key, value, scale=scale, **features)
        return dense_attention_reference(query, key, value, scale=scale, query_offset=query_offset, **features)
    if backend != "reference" and query_offset == 0 and fused_backend(query, key, value, scale=scale) is not None:
        return dense_attention_sdpa(query, key, value, scale=scale)
    return dense_attention_reference(query, key, value, scale=scale, query_offset=query_offset)


def dense_attention_bytes(query: Tensor, key: Tensor, value: Tensor, *, scale: float, backend: Backend = "auto") -> int:
    """Estimated bytes ``dense_attention`` allocates for these inputs (output, lse, copies, scratch).

    Fused path: the output and the float32 lse (plus keys and values repeated per query head
    for efficient attention). Reference: float32 copies of q, k, v and of the output, and the
    chunked scores (at most 128 rows x T keys x heads, 3 float32 buffers). O(T) either way.
    """
    from sparse_lens.kernels.dense_sdpa import fused_backend

    batch, n_q_heads, seq_len, d_head = query.shape
    elements_out = batch * n_q_heads * seq_len * value.shape[-1]
    lse_bytes = batch * n_q_heads * seq_len * 4
    fused = backend != "reference" and fused_backend(query, key, value, scale=scale)
    if fused:
        repeated = 2 * elements_out * value.element_size() if str(fused).endswith("EFFICIENT_ATTENTION") else 0
        return elements_out * query.element_size() + lse_bytes + repeated
    copies = 4 * (query.numel() + key.numel() + value.numel() + elements_out)
    row_bytes = 3 * 4 * batch * n_q_heads * seq_len  # one query row of scores, 3 float32 buffers
    scores = row_bytes * max(1, min(128, seq_len, 256 * 2**20 // row_bytes))  # dense's chunking
    return copies + elements_out * query.element_size() + lse_bytes + scores


def kept_block_mass(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    lse: Float[Tensor, "batch q_head seq"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    backend: Backend = "auto",
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> Float[Tensor, "batch q_head n_query_blocks top_k"]:
    """Mass of each kept block under a given lse (see ``sparse_attention.kept_block_mass``).

    ``sinks`` is accepted so a layer's settings pass through whole; the sink only enters via ``lse``.
    """
    check_attention_features(window, softcap, sinks, query.shape[1])
    settings = dict(query_block=query_block, key_block=key_block, scale=scale, window=window, softcap=softcap)
    if use_triton(backend, query, query_block, key_block):
        from sparse_lens.kernels.block_mass_triton import kept_block_mass_triton

        return kept_block_mass_triton(query, key, block_indices, lse, **settings)
    from sparse_lens.kernels.sparse_attention import kept_block_mass as kept_block_mass_reference

    return kept_block_mass_reference(query, key, block_indices, lse, **settings)


def block_mass_rows(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    lse: Float[Tensor, "batch q_head seq"],
    rows: Int[Tensor, "n_rows"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    backend: Backend = "auto",
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> Float[Tensor, "batch q_head n_rows n_key_blocks"]:
    """Dense mass of every key block for some query blocks (see ``dense.block_mass_rows``).

    ``sinks`` is accepted so a layer's settings pass through whole; the sink only enters via ``lse``.
    """
    check_attention_features(window, softcap, sinks, query.shape[1])
    settings = dict(query_block=query_block, key_block=key_block, scale=scale, window=window, softcap=softcap)
    if use_triton(backend, query, query_block, key_block):
        from sparse_lens.kernels.block_mass_triton import block_mass_rows_triton

        return block_mass_rows_triton(query, key, lse, rows, **settings)
    from sparse_lens.kernels.dense import block_mass_rows as block_mass_rows_reference

    return block_mass_rows_reference(query, key, lse, rows, **settings)
