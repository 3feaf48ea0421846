"""One entry point for every block-selection estimator: ``estimate_blocks(..., estimator=name)``.

| name | what it is | where |
|---|---|---|
| ``"rescored"`` (default) | a search (``rescore_search``: Stream or bounds) with ``beam`` x the branches, then exact block masses of the candidates (every ``rescore_query_stride``-th query); keeps the heaviest | ``rescore_ref.py``; on Triton: Stream's kernel + ``rescore_triton`` |
| ``"adaptive"`` | the same candidates (``top_k`` of them), keeps per row the fewest whose mass reaches ``top_p`` (at least ``min_blocks``) | ``rescore_ref.py``; on Triton as above |
| ``"stream"`` | the paper's Stream refinement (representative keys of each branch's centre block) | ``estimator_ref.py``, ``estimator_triton.py`` |
| ``"bounds"`` | hierarchical search scored by Quest's key min / max bound | ``search_ref.py`` |
| ``"pooled"`` | hierarchical search scored by mean keys | ``search_ref.py`` |
| ``"oneshot_pooled"`` | mean query . mean key of every block pair (MInference / FlexPrefill style baseline) | ``oneshot_ref.py`` |
| ``"antidiagonal"`` | strided antidiagonal sums of every block pair (XAttention-style baseline) | ``oneshot_ref.py`` |
| ``"oracle"`` | the exact top-k key blocks by dense block mass beside the sink and local blocks: the ceiling, for measurement (O(T^2) time) | ``oracle_estimate.py`` |

All return int64 ``[batch, q_head, n_query_blocks, top_k]`` kept key blocks, ascending, ``-1`` in
unused slots (``"adaptive"`` uses ``top_k`` as its cap and leaves unused slots). ``causal=True``
wraps any of them in the strictly causal *lagged selection* of ``causal.py``.

Backends: ``"stream"`` has its own Triton kernel. ``"rescored"`` and ``"adaptive"`` with
``rescore_search="stream"`` run on Triton too, as two kernels: Stream's search keeps the
candidates, then the fused rescoring kernel (``rescore_triton.py``) computes their exact block
masses from ``q . k`` alone (every ``rescore_query_stride``-th query) and selects in the same
launch (top-k, or per-row top-p without a sort). Everything else is torch code
running on the tensors' device (slow on long GPU inputs: the bounds search and the chunked exact
masses). Why ``"rescored"`` is the default: docs/fidelity.md.
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.causal import causal_inner_budget, lagged_selection
from sparse_lens.kernels.dispatch import Backend, stream_estimate, use_triton
from sparse_lens.kernels.oneshot_ref import antidiagonal_estimate, oneshot_pooled_estimate
from sparse_lens.kernels.oracle_estimate import oracle_estimate
from sparse_lens.kernels.rescore_ref import adaptive_estimate, rescored_estimate
from sparse_lens.kernels.search_ref import SearchName, bounds_estimate, pooled_estimate

EstimatorName = Literal["rescored", "adaptive", "stream", "bounds", "pooled", "oneshot_pooled", "antidiagonal", "oracle"]
ESTIMATORS: tuple[str, ...] = (
    "rescored", "adaptive", "stream", "bounds", "pooled", "oneshot_pooled", "antidiagonal", "oracle")


def estimate_blocks(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    estimator: EstimatorName = "rescored",
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    representative_keys: int = 8,
    beam: int = 4,
    rescore_search: SearchName = "stream",
    rescore_query_stride: int = 1,
    top_p: float = 0.93,
    min_blocks: int = 4,
    antidiagonal_stride: int = 8,
    scale: float | None = None,
    backend: Backend = "auto",
    causal: bool = False,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Kept key blocks per (batch, query head, query block) by the named estimator.

    Args:
        query: Rotated queries.
        key: Rotated keys (``kv_head`` divides ``q_head``: GQA).
        estimator: One of ``ESTIMATORS`` (table in this module's docstring).
        query_block, key_block, top_k, sink_blocks, local_blocks: The block budget
            (``StreamConfig``'s fields of the same names).
        representative_keys: ``"stream"`` only: keys read per candidate branch.
        beam: ``"rescored"``: candidates kept by the search, as a multiple of the searched slots.
        rescore_search: ``"rescored"`` / ``"adaptive"``: the candidate search (``"stream"``,
            ``"bounds"`` or ``"pooled"``).
        rescore_query_stride: ``"rescored"`` / ``"adaptive"``: exact masses use every n-th query.
        top_p: ``"adaptive"``: estimated mass to reach per row.
        min_blocks: ``"adaptive"``: fewest blocks kept per row.
        antidiagonal_stride: ``"antidiagonal"``: stride of the scored antidiagonals.
        scale: Softmax scale of the attention (default ``d_head ** -0.5``); exact masses use it.
        backend: ``"stream"`` only: Triton or the torch reference (see ``dispatch.py``).
        causal: Strictly causal selection (``causal.py``): the estimator runs with
            ``top_k - ceil(query_block / key_block)`` blocks and query block ``b`` keeps the
            blocks chosen for the query block before it plus the key blocks overlapping ``b``, so
            no query's blocks depend on later tokens. ``False``: each query block's own queries
            choose its blocks (later tokens of a block steer what earlier ones read).
    """
    if causal:
        inner = causal_inner_budget(query_block=query_block, key_block=key_block, top_k=top_k,
                                    sink_blocks=sink_blocks, local_blocks=local_blocks, min_blocks=min_blocks)
        rows = estimate_blocks(
            query, key, estimator=estimator, query_block=query_block, key_block=key_block, top_k=inner["top_k"],
            sink_blocks=sink_blocks, local_blocks=inner["local_blocks"], representative_keys=representative_keys,
            beam=beam, rescore_search=rescore_search, rescore_query_stride=rescore_query_stride, top_p=top_p,
            min_blocks=inner["min_blocks"], antidiagonal_stride=antidiagonal_stride, scale=scale, backend=backend)
        return lagged_selection(rows, seq_len=query.shape[2], query_block=query_block, key_block=key_block, top_k=top_k)
    budget = dict(query_block=query_block, key_block=key_block, sink_blocks=sink_blocks, local_blocks=local_blocks)
    fused = rescore_search == "stream" and use_triton(backend, query, query_block, key_block)
    if estimator in ("rescored", "adaptive") and fused:
        from sparse_lens.kernels.rescore_triton import rescore_top_k_triton, rescore_top_p_triton

        width = top_k if estimator == "adaptive" else sink_blocks + local_blocks + beam * (top_k - sink_blocks - local_blocks)
        candidates = stream_estimate(query, key, top_k=width, representative_keys=representative_keys, backend=backend,
                                     **budget)
        rescore = dict(scale=scale, query_stride=rescore_query_stride, **budget)
        if estimator == "rescored":
            return rescore_top_k_triton(query, key, candidates, top_k=top_k, **rescore)
        return rescore_top_p_triton(query, key, candidates, p=top_p, min_blocks=min_blocks, **rescore)
    if estimator == "rescored":
        return rescored_estimate(query, key, top_k=top_k, beam=beam, search=rescore_search, scale=scale,
                                 representative_keys=representative_keys, query_stride=rescore_query_stride, **budget)
    if estimator == "adaptive":
        return adaptive_estimate(query, key, p=top_p, min_blocks=min_blocks, max_blocks=top_k, search=rescore_search,
                                 representative_keys=representative_keys, estimate="exact", scale=scale,
                                 query_stride=rescore_query_stride, **budget)
    if estimator == "stream":
        return stream_estimate(query, key, top_k=top_k, representative_keys=representative_keys, backend=backend,
                               **budget)
    if estimator == "bounds":
        return bounds_estimate(query, key, top_k=top_k, **budget)
    if estimator == "pooled":
        return pooled_estimate(query, key, top_k=top_k, **budget)
    if estimator == "oneshot_pooled":
        return oneshot_pooled_estimate(query, key, top_k=top_k, **budget)
    if estimator == "antidiagonal":
        return antidiagonal_estimate(query, key, top_k=top_k, stride=antidiagonal_stride, scale=scale, **budget)
    if estimator == "oracle":
        return oracle_estimate(query, key, top_k=top_k, scale=scale, backend=backend, **budget)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
