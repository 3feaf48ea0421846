"""The estimators, registered once each: name, function and its own settings.

| name | what it is | settings | where |
|---|---|---|---|
| ``"rescored"`` (default) | a search (``rescore_search``: Stream or bounds) with ``beam`` x the branches, then exact block masses of the candidates (every ``rescore_query_stride``-th query); keeps the heaviest | ``RescoredSettings`` | ``rescore.py``; on Triton: Stream's or the bounds kernel + ``rescore_triton`` |
| ``"adaptive"`` | the same candidates (``top_k`` of them), keeps per row the fewest whose mass reaches ``top_p`` (at least ``min_blocks``) | ``AdaptiveSettings`` | ``rescore.py``; on Triton as above |
| ``"stream"`` | the paper's Stream refinement (representative keys of each branch's centre block) | ``StreamSettings`` | ``stream.py``, ``stream_triton.py`` |
| ``"bounds"`` | hierarchical search scored by Quest's key min / max bound | none | ``search.py``, ``bounds_triton.py`` |
| ``"pooled"`` | hierarchical search scored by mean keys | none | ``search.py`` |
| ``"oneshot_pooled"`` | mean query . mean key of every block pair (MInference / FlexPrefill style baseline) | none | ``oneshot.py`` |
| ``"antidiagonal"`` | strided antidiagonal sums of every block pair (XAttention-style baseline) | ``AntidiagonalSettings`` | ``oneshot.py`` |
| ``"oracle"`` | the exact top-k key blocks by dense block mass beside the sink and local blocks: the ceiling, for measurement (O(T^2) time) | none | ``oracle_estimate.py`` |

Every estimator returns int64 ``[batch, q_head, n_query_blocks, top_k]`` kept key blocks,
ascending, ``-1`` in unused slots (``"adaptive"`` uses ``top_k`` as its cap and leaves unused
slots). ``estimate_blocks`` (``estimate.py``) is the one public entry point: it validates the
inputs once and calls ``Estimator.estimate`` with a ``BlockGeometry``; ``causal=True`` wraps any
estimator in the strictly causal *lagged selection* of ``causal.py``.

Backends: ``"stream"`` has its own Triton kernel. ``"rescored"`` and ``"adaptive"`` are composed
once (``rescore.rescored_estimate_unchecked`` / ``adaptive_estimate_unchecked``): the search,
then the rescoring, each on the backend (``dispatch.py``): with ``backend`` resolving to Triton,
Stream's and the bounds search run on their kernels (``stream_triton.py``, ``bounds_triton.py``)
and the fused rescoring kernel (``rescore_triton.py``) computes the candidates' exact masses from
``q . k`` alone and selects in the same launch. The pooled search and the baselines are torch
code on the tensors' device. Why ``"rescored"`` is
the default: docs/fidelity.md.

To add an estimator: write it (docs/developing.md), give it a settings dataclass if it has
settings of its own (frozen, plain fields with defaults and a ``help``), and add one
``Estimator`` to ``REGISTRY`` below. ``ESTIMATORS`` (the names), ``estimate_blocks``,
``TracingConfig`` and the command-line choices all read this table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable

from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.kernels.checks import is_int_at_least
from sparse_lens.kernels.dispatch import Backend, bounds_estimate_unchecked, stream_estimate_unchecked
from sparse_lens.kernels.oneshot import antidiagonal_estimate_unchecked, oneshot_pooled_estimate_unchecked
from sparse_lens.kernels.oracle_estimate import oracle_estimate
from sparse_lens.kernels.rescore import adaptive_estimate_unchecked, rescored_estimate_unchecked
from sparse_lens.kernels.search import (
    SEARCHES,
    SearchName,
    pooled_estimate_unchecked,
)


def _positive_int(settings: Any, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if not is_int_at_least(value, 1):
            raise InvalidConfigError(f"{name} must be an int >= 1, got {value!r}.")


# ----- settings: one frozen dataclass per estimator -------------------------------------------
@dataclass(frozen=True)
class EstimatorSettings:
    """Settings of an estimator that has none of its own (``"bounds"``, ``"pooled"``,
    ``"oneshot_pooled"``, ``"oracle"``); the base class of every estimator's settings."""

    def check(self, geometry: BlockGeometry) -> None:
        """Raise ``InvalidConfigError`` if these settings do not fit ``geometry`` (fields alone
        are checked when the settings are built)."""

    def for_inner_budget(self, n_band: int) -> "EstimatorSettings":
        """The settings of the inner estimator of causal selection, whose band of ``n_band``
        blocks is kept outside it (``causal.py``): unchanged unless a setting counts blocks."""
        return self


@dataclass(frozen=True)
class StreamSettings(EstimatorSettings):
    """``"stream"``: the paper's estimator."""

    representative_keys: int = field(default=8, metadata={
        "help": "keys read to score a candidate branch (evenly strided keys of its centre block; "
                "key_block reads the whole block); estimation cost is proportional to it"})

    def __post_init__(self) -> None:
        _positive_int(self, "representative_keys")

    def check(self, geometry: BlockGeometry) -> None:
        if self.representative_keys > geometry.key_block:
            raise InvalidConfigError(
                f"representative_keys must be between 1 and key_block={geometry.key_block}, got "
                f"{self.representative_keys!r} (the default is {type(self)().representative_keys}; for smaller key "
                f"blocks pass estimator_settings={type(self).__name__}(representative_keys=...)).")


@dataclass(frozen=True)
class RescoredSettings(StreamSettings):
    """``"rescored"``: a wide search, then exact block masses of its candidates."""

    beam: int = field(default=4, metadata={"help": "candidates kept by the search, as a multiple of the searched slots"})
    rescore_search: SearchName = field(default="stream", metadata={
        "help": "how candidates are found: 'stream' (Stream's search, on its Triton kernel on the GPU), "
                "'bounds' (Quest-style key min / max bounds, on its Triton kernel on the GPU) or "
                "'pooled' (mean keys, torch)"})
    rescore_query_stride: int = field(default=1, metadata={
        "help": "exact candidate masses use every n-th query of a block (cost proportional to 1 / n)"})

    def __post_init__(self) -> None:
        _positive_int(self, "representative_keys", "beam", "rescore_query_stride")
        if self.rescore_search not in SEARCHES:
            raise InvalidConfigError(f"rescore_search must be one of {SEARCHES}, got {self.rescore_search!r}.")


@dataclass(frozen=True)
class AdaptiveSettings(StreamSettings):
    """``"adaptive"``: the rescored candidates (``top_k`` of them, the cap), keeping per row the
    fewest whose estimated mass reaches ``top_p``."""

    top_p: float = field(default=0.93, metadata={"help": "estimated attention mass each row keeps, in (0, 1]"})
    min_blocks: int = field(default=4, metadata={"help": "fewest key blocks a row keeps (at most top_k)"})
    rescore_search: SearchName = field(default="stream", metadata={
        "help": "how candidates are found: 'stream', 'bounds' or 'pooled' (as for 'rescored')"})
    rescore_query_stride: int = field(default=1, metadata={
        "help": "exact candidate masses use every n-th query of a block (cost proportional to 1 / n)"})

    def __post_init__(self) -> None:
        _positive_int(self, "representative_keys", "min_blocks", "rescore_query_stride")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidConfigError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.rescore_search not in SEARCHES:
            raise InvalidConfigError(f"rescore_search must be one of {SEARCHES}, got {self.rescore_search!r}.")

    def check(self, geometry: BlockGeometry) -> None:
        super().check(geometry)
        if self.min_blocks > geometry.top_k:
            raise InvalidConfigError(
                f"estimator 'adaptive' keeps between min_blocks={self.min_blocks} and top_k={geometry.top_k} "
                "blocks per row: min_blocks must not exceed top_k.")
        if self.min_blocks == geometry.top_k:
            warnings.warn(
                f"estimator 'adaptive' with min_blocks={self.min_blocks} = top_k keeps top_k blocks in every row: "
                f"top_p={self.top_p} has no effect. Lower min_blocks (AdaptiveSettings(min_blocks=...), "
                "--min-blocks) or raise top_k.", UserWarning, stacklevel=2)

    def for_inner_budget(self, n_band: int) -> "AdaptiveSettings":
        # min_blocks counts the band, which causal selection keeps outside the inner estimator.
        return type(self)(**{**_as_dict(self), "min_blocks": max(self.min_blocks - n_band, 1)})


@dataclass(frozen=True)
class AntidiagonalSettings(EstimatorSettings):
    """``"antidiagonal"``: the XAttention-style baseline."""

    antidiagonal_stride: int = field(default=8, metadata={"help": "stride of the scored antidiagonals"})

    def __post_init__(self) -> None:
        _positive_int(self, "antidiagonal_stride")


def _as_dict(settings: EstimatorSettings) -> dict[str, Any]:
    return {item.name: getattr(settings, item.name) for item in fields(settings)}


# ----- the registry ------------------------------------------------------------------------------
EstimateFn = Callable[..., Int[Tensor, "batch q_head n_query_blocks top_k"]]


@dataclass(frozen=True)
class Estimator:
    """One registered estimator.

    Attributes:
        name: What ``TracingConfig.estimator`` and ``estimate_blocks(estimator=)`` call it.
        estimate: ``estimate(query, key, geometry, settings, *, scale, backend)`` on inputs
            ``estimate_blocks`` has validated: rotated queries ``[batch, q_head, seq, d_head]``,
            keys ``[batch, kv_head, seq, d_head]``, a ``BlockGeometry``, an instance of
            ``settings``, the softmax scale (``None``: ``d_head ** -0.5``) and the backend;
            returns int64 ``[batch, q_head, n_query_blocks, top_k]`` (the row contract).
        settings: Its settings dataclass (``EstimatorSettings`` when it has none).
        summary: One line for tables and ``--help``.
    """

    name: str
    estimate: EstimateFn
    settings: type[EstimatorSettings]
    summary: str

    def setting_names(self) -> tuple[str, ...]:
        return tuple(item.name for item in fields(self.settings))


Query = Float[Tensor, "batch q_head seq d_head"]
Key = Float[Tensor, "batch kv_head seq d_head"]


def _rescored(query: Query, key: Key, geometry: BlockGeometry, settings: RescoredSettings, *, scale: float | None,
              backend: Backend) -> Tensor:
    return rescored_estimate_unchecked(
        query, key, geometry, beam=settings.beam, search=settings.rescore_search, scale=scale,
        representative_keys=settings.representative_keys, query_stride=settings.rescore_query_stride, backend=backend)


def _adaptive(query: Query, key: Key, geometry: BlockGeometry, settings: AdaptiveSettings, *, scale: float | None,
              backend: Backend) -> Tensor:
    return adaptive_estimate_unchecked(
        query, key, geometry, p=settings.top_p, min_blocks=settings.min_blocks, search=settings.rescore_search,
        representative_keys=settings.representative_keys, scale=scale, query_stride=settings.rescore_query_stride,
        backend=backend)


def _stream(query: Query, key: Key, geometry: BlockGeometry, settings: StreamSettings, *, scale: float | None,
            backend: Backend) -> Tensor:
    return stream_estimate_unchecked(query, key, geometry, representative_keys=settings.representative_keys,
                                     backend=backend)


def _bounds(query: Query, key: Key, geometry: BlockGeometry, settings: EstimatorSettings, *, scale: float | None,
            backend: Backend) -> Tensor:
    return bounds_estimate_unchecked(query, key, geometry, backend=backend)


def _pooled(query: Query, key: Key, geometry: BlockGeometry, settings: EstimatorSettings, *, scale: float | None,
            backend: Backend) -> Tensor:
    return pooled_estimate_unchecked(query, key, geometry)


def _oneshot_pooled(query: Query, key: Key, geometry: BlockGeometry, settings: EstimatorSettings, *,
                    scale: float | None, backend: Backend) -> Tensor:
    return oneshot_pooled_estimate_unchecked(query, key, geometry)


def _antidiagonal(query: Query, key: Key, geometry: BlockGeometry, settings: AntidiagonalSettings, *,
                  scale: float | None, backend: Backend) -> Tensor:
    return antidiagonal_estimate_unchecked(query, key, geometry, stride=settings.antidiagonal_stride, scale=scale)


def _oracle(query: Query, key: Key, geometry: BlockGeometry, settings: EstimatorSettings, *, scale: float | None,
            backend: Backend) -> Tensor:
    return oracle_estimate(query, key, scale=scale, backend=backend, **geometry.as_kwargs())


REGISTRY: MappingProxyType[str, Estimator] = MappingProxyType({entry.name: entry for entry in (
    Estimator("rescored", _rescored, RescoredSettings,
              "a wide search, then exact block masses of the candidates; keeps the heaviest (default)"),
    Estimator("adaptive", _adaptive, AdaptiveSettings,
              "the rescored candidates, keeping per row the fewest whose mass reaches top_p"),
    Estimator("stream", _stream, StreamSettings, "the paper's Stream estimator (fastest)"),
    Estimator("bounds", _bounds, EstimatorSettings, "hierarchical search scored by Quest's key min / max bound"),
    Estimator("pooled", _pooled, EstimatorSettings, "hierarchical search scored by mean keys"),
    Estimator("oneshot_pooled", _oneshot_pooled, EstimatorSettings,
              "mean query . mean key of every block pair (baseline)"),
    Estimator("antidiagonal", _antidiagonal, AntidiagonalSettings,
              "strided antidiagonal sums of every block pair (XAttention-style baseline)"),
    Estimator("oracle", _oracle, EstimatorSettings,
              "the exact top-k blocks by dense block mass: the ceiling, O(T^2), for measurement"),
)})
ESTIMATORS: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_ESTIMATOR = "rescored"


def get_estimator(name: str) -> Estimator:
    """The registered estimator called ``name``; ``InvalidConfigError`` naming the choices otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise InvalidConfigError(f"estimator must be one of {ESTIMATORS}, got {name!r}.")
    return REGISTRY[name]


def settings_from_fields(name: str, values: dict[str, Any]) -> EstimatorSettings:
    """``name``'s settings built from flat fields (the pre-registry spelling, e.g. ``beam=2``):
    the fields it has are used; each other known field is validated by the settings class that
    has it and then ignored (as the flat config did). ``TypeError`` for a field no estimator has."""
    entry = get_estimator(name)
    known = {item for each in REGISTRY.values() for item in each.setting_names()}
    unknown = set(values) - known
    if unknown:
        raise TypeError(f"unknown estimator setting(s) {sorted(unknown)}; known: {sorted(known)}.")
    for other in {each.settings for each in REGISTRY.values()} - {entry.settings}:
        own = {key: value for key, value in values.items() if key in {item.name for item in fields(other)}}
        if own and not set(own) <= set(entry.setting_names()):
            other(**own)  # raises InvalidConfigError for an invalid value, as the flat config did
    return entry.settings(**{key: value for key, value in values.items() if key in entry.setting_names()})
