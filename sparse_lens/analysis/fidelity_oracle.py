"""The exact top-k oracle's recall, computed once per dense trace and budget (:class:`OracleCache`).

``sl.fidelity`` scores every estimator configuration against the exact top-k oracle: per layer,
the key blocks of largest dense block mass at the configuration's budget
(:func:`~sparse_lens.kernels.oracle_blocks`). The oracle depends on the dense trace (the layer's
q, k, lse, scale, window, soft-cap, sinks) and on the budget's arguments only: block sizes,
``top_k``, the backend and the query blocks it is computed on (those where pruning happens,
every ``oracle_stride``-th). Not on the estimator, ``sink_blocks`` / ``local_blocks`` or the causal
selection, which shape the estimate, not the oracle. On the CPU it is most of a configuration's
scoring time, so a run that scores several configurations on one trace computes it once per
budget and layer: ``cache = OracleCache(dense)``, then ``sl.fidelity(..., dense=dense,
oracle_cache=cache)`` for each configuration. The cache belongs to that run (no module state)
and holds ``[batch, q_head, n_rows]`` float32 recalls per entry (a few KB).
"""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels import oracle_blocks


class OracleCache:
    """The oracle recalls of one dense trace (``DenseTrace``), keyed by layer and budget.

    Use it with the trace it was made for: ``sl.fidelity(..., dense=trace, oracle_cache=cache)``
    with another trace (or none) raises ``InvalidConfigError``. ``calls`` counts the oracle
    computations it ran (the misses); ``len(cache)`` the entries held.
    """

    def __init__(self, trace) -> None:
        self.trace = trace
        self.calls = 0
        self._recalls: dict[tuple, Tensor] = {}

    def __len__(self) -> int:
        return len(self._recalls)

    def check_trace(self, dense) -> None:
        """``InvalidConfigError`` unless ``dense`` is the trace this cache was made for."""
        if dense is not self.trace:
            raise InvalidConfigError(
                "oracle_cache holds the oracle of another dense trace (or dense= was not passed): pass "
                "dense=cache.trace, or a new OracleCache(dense) for this trace."
            )

    def recall(self, layer: int, query: Tensor, key: Tensor, lse: Tensor, *, rows: Int[Tensor, "n_rows"],
               query_block: int, key_block: int, top_k: int, backend: str = "auto",
               **layer_features) -> Float[Tensor, "batch q_head n_rows"]:
        """:func:`oracle_recall` of ``layer``'s trace tensors, computed on the first call with this
        budget (``rows``, block sizes, ``top_k``, ``backend``) and returned from the cache after.
        ``layer_features`` (``scale``, ``window``, ``softcap``, ``sinks``) are the trace's layer's,
        so the layer stands for them in the key."""
        budget = (layer, tuple(rows.tolist()), query_block, key_block, top_k, backend)
        if budget not in self._recalls:
            self.calls += 1
            self._recalls[budget] = oracle_recall(query, key, lse, rows=rows, query_block=query_block,
                                                  key_block=key_block, top_k=top_k, backend=backend, **layer_features)
        return self._recalls[budget]


def oracle_recall(query: Float[Tensor, "batch q_head seq d_head"], key: Float[Tensor, "batch kv_head seq d_head"],
                  lse: Float[Tensor, "batch q_head seq"], *, rows: Int[Tensor, "n_rows"],
                  **oracle_kwargs) -> Float[Tensor, "batch q_head n_rows"]:
    """The exact top-k oracle's recall on query blocks ``rows``: the summed dense mass of its
    blocks (``oracle_blocks(...)[1].sum(-1)``; ``oracle_kwargs`` are ``oracle_blocks``'s)."""
    _, mass = oracle_blocks(query, key, lse, rows=rows, **oracle_kwargs)
    return mass.sum(-1)

