"""One entry point for every block-selection estimator: ``estimate_blocks(..., estimator=name)``.

The estimators, their settings and where their code lives are listed once, in ``registry.py``
(``REGISTRY``; ``ESTIMATORS`` holds the names). ``estimate_blocks`` is the public boundary: it
checks q / k (``checks.check_attention_inputs``), builds or receives the ``BlockGeometry`` and
the estimator's settings (validated when they are built), and calls the registered function,
which checks nothing again. ``causal=True`` wraps any estimator in the strictly causal *lagged
selection* of ``causal.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.kernels.causal import band_blocks, causal_inner_geometry, lagged_selection
from sparse_lens.kernels.checks import check_attention_inputs
from sparse_lens.kernels.dispatch import Backend, use_triton
from sparse_lens.kernels.registry import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    EstimatorSettings,
    get_estimator,
    settings_from_fields,
)

__all__ = ["ESTIMATORS", "estimate_blocks"]


def estimate_blocks(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry | None = None,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    settings: EstimatorSettings | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
    causal: bool = False,
    query_block: int | None = None,
    key_block: int | None = None,
    top_k: int | None = None,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    **legacy_settings: Any,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Kept key blocks per (batch, query head, query block) by the named estimator.

    Args:
        query: Rotated queries.
        key: Rotated keys (``kv_head`` divides ``q_head``: GQA).
        geometry: The block budget (``TracingConfig.geometry``). Or give ``query_block``,
            ``key_block``, ``top_k`` (and ``sink_blocks``, ``local_blocks``, default 0) and it is
            built here.
        estimator: A name of ``ESTIMATORS`` (``registry.py`` lists them).
        settings: The estimator's own settings (e.g. ``RescoredSettings(beam=2)``); default: its
            defaults. ``TracingConfig.estimator_settings`` carries them.
        scale: Softmax scale of the attention (default ``d_head ** -0.5``); exact masses use it.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (``dispatch.py``) for the parts
            that have a Triton kernel (Stream's search, the rescoring, the oracle's masses).
        causal: Strictly causal selection (``causal.py``): the estimator runs with
            ``top_k - ceil(query_block / key_block)`` blocks and query block ``b`` keeps the
            blocks chosen for the query block before it plus the key blocks overlapping ``b``, so
            no query's blocks depend on later tokens. ``False``: each query block's own queries
            choose its blocks (later tokens of a block steer what earlier ones read).
        legacy_settings: Deprecated: the estimator's settings as flat keywords (``beam=2``,
            ``top_p=0.9``, ...), the spelling before ``settings=``; keywords the estimator does
            not have are ignored, as before.

    Returns:
        int64 ``[batch, q_head, n_query_blocks, top_k]``, ascending, ``-1`` in unused slots at
        the end of a row (``"adaptive"``: ``top_k`` is its cap).

    Raises:
        ShapeError: Malformed q / k.
        BlockSizeError, InvalidConfigError: A bad block budget, unknown estimator, settings of
            another estimator, settings that do not fit the geometry, or a ``top_k`` too small
            for causal selection.
    """
    check_attention_inputs(query, key)
    entry = get_estimator(estimator)
    if geometry is None:
        geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    elif (query_block, key_block, top_k) != (None, None, None) or (sink_blocks, local_blocks) != (0, 0):
        raise TypeError("estimate_blocks: give either geometry= or the flat block fields, not both.")
    if legacy_settings:
        if settings is not None:
            raise TypeError(f"estimate_blocks: give either settings= or flat settings, got both ({sorted(legacy_settings)}).")
        warnings.warn(f"estimate_blocks(..., {', '.join(sorted(legacy_settings))}=...) is deprecated: pass "
                      f"settings={entry.settings.__name__}(...) (sparse_lens.kernels.registry).",
                      DeprecationWarning, stacklevel=2)
        settings = settings_from_fields(estimator, legacy_settings)
    settings = entry.settings() if settings is None else settings
    if type(settings) is not entry.settings:
        raise InvalidConfigError(f"estimator {estimator!r} takes {entry.settings.__name__}, got {type(settings).__name__}.")
    settings.check(geometry)
    use_triton(backend, query, geometry.query_block, geometry.key_block)  # InvalidConfigError for a bad backend
    if not causal:
        return entry.estimate(query, key, geometry, settings, scale=scale, backend=backend)
    inner = causal_inner_geometry(geometry)
    n_band = band_blocks(geometry.query_block, geometry.key_block)
    rows = entry.estimate(query, key, inner, settings.for_inner_budget(n_band), scale=scale, backend=backend)
    return lagged_selection(rows, seq_len=query.shape[2], query_block=geometry.query_block,
                            key_block=geometry.key_block, top_k=geometry.top_k)
