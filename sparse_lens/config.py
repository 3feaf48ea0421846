"""TracingConfig: the knobs of Sparse Tracing shared by every estimator, validated once, immutable.

``TracingConfig`` holds what every estimator uses (the block geometry, ``top_k``, sink and local
blocks, causal selection, mode, backend); the estimator's own settings are a small dataclass of
its own (``RescoredSettings``, ``AdaptiveSettings``, ``StreamSettings``, ...: registered with the
estimator in ``sparse_lens/kernels/registry.py``), carried in ``estimator_settings``.
``StreamConfig``, the former flat config, stays one release as a deprecated alias.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.kernels.causal import causal_inner_geometry
from sparse_lens.kernels.checks import is_int_at_least
from sparse_lens.kernels.dispatch import BACKENDS
from sparse_lens.kernels.registry import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    REGISTRY,
    AdaptiveSettings,
    AntidiagonalSettings,
    EstimatorSettings,
    RescoredSettings,
    StreamSettings,
    get_estimator,
    settings_from_fields,
)

Mode = Literal["sparse", "observe", "dense"]
MODES = ("sparse", "observe", "dense")
# The settings fields of the former flat StreamConfig (each now belongs to one estimator's settings).
LEGACY_SETTINGS = ("representative_keys", "beam", "rescore_search", "rescore_query_stride", "top_p", "min_blocks",
                   "antidiagonal_stride")

__all__ = ["ESTIMATORS", "MODES", "AdaptiveSettings", "AntidiagonalSettings", "EstimatorSettings", "Mode",
           "RescoredSettings", "StreamConfig", "StreamSettings", "TracingConfig"]


@dataclass(frozen=True)
class TracingConfig:
    """How every attention layer estimates and uses its block-sparse pattern.

    Attributes:
        query_block: Tokens per query block (rows of the block pattern).
        key_block: Tokens per key block (columns). One of the two block sizes must divide
            the other so that block grids line up.
        top_k: Key blocks kept per query block, sink and local blocks included. A query block
            that sees ``top_k`` causal key blocks or fewer keeps all of them. With
            ``estimator="adaptive"`` it is the cap (rows keep between ``min_blocks`` and ``top_k``).
        sink_blocks: Always-kept key blocks at the start of the sequence.
        local_blocks: Always-kept key blocks ending at the query block's diagonal. With
            ``key_block < query_block`` use ``local_blocks >= query_block // key_block`` so that
            every query sees its own position.
        estimator: How kept blocks are chosen, a name of ``ESTIMATORS`` (``kernels/registry.py``):
            ``"rescored"`` (default: a search keeping ``beam`` x the blocks, then exact block
            masses of those candidates pick the heaviest; measured closest to the exact top-k
            oracle, see docs/fidelity.md), ``"adaptive"`` (the same candidates, keeping per row
            the fewest whose mass reaches ``top_p``), ``"stream"`` (the paper's estimator, with a
            Triton kernel), the comparison baselines ``"bounds"``, ``"pooled"``,
            ``"oneshot_pooled"``, ``"antidiagonal"``, and ``"oracle"`` (the exact top-k blocks
            by dense block mass: the ceiling, O(T^2) time, for measurement).
        estimator_settings: The estimator's own settings, an instance of its registered
            settings class (``RescoredSettings(beam=..., rescore_search=...,
            rescore_query_stride=..., representative_keys=...)``, ``AdaptiveSettings(top_p=...,
            min_blocks=..., ...)``, ``StreamSettings(representative_keys=...)``,
            ``AntidiagonalSettings(antidiagonal_stride=...)``; ``EstimatorSettings()`` for the
            others). ``None`` (default): the estimator's defaults.
        causal_selection: Strictly causal selection (``kernels/causal.py``): query block
            ``b`` keeps the key blocks the estimator chose for the query block before it plus the
            ``ceil(query_block / key_block)`` key blocks overlapping ``b`` (the estimator runs with
            that many fewer blocks), so what a position reads never depends on later tokens.
            ``False``: each query block's own queries choose its blocks, so changing token
            ``p + 1`` can change the output at ``p`` (docs/concepts.md, "Causality of the selection").
        mode: ``"sparse"``: the model runs on the sparse attention (downstream activations
            change). ``"observe"``: the model runs exact dense attention (flash kernels with
            their log-sum-exp on the GPU, O(T) memory, quadratic time) and the sparse estimate
            is recorded beside it. ``"dense"``: plain dense causal attention (torch SDPA), no
            estimate and no ``hook_pattern``: the fast baseline for comparisons (task accuracy,
            patching references).
        keep_qk: Keep each layer's rotated queries and keys inside the cached pattern so that
            token-level values can be recomputed (``BlockSparsePattern.token_probs``). Costs
            O(T * d_head) per head; turn off for very long contexts.
        observe_max_tokens: Optional cap on the sequence length in ``"observe"`` mode (None, the
            default: no cap). Observe mode's dense attention is O(T) in memory (flash kernels on
            the GPU, chunked elsewhere) and quadratic only in time; an input whose estimated
            memory exceeds what the device has free raises ``ContextTooLongError`` either way.
        backend: Kernel implementation: ``"auto"`` (Triton on CUDA tensors, the torch reference
            elsewhere), ``"triton"`` or ``"reference"`` to force one.

    Raises:
        BlockSizeError, InvalidConfigError: on construction (and ``replace``), for any field
            out of range, an unknown estimator, settings of another estimator, or a ``top_k`` too
            small for causal selection.
    """

    query_block: int = field(default=64, metadata={"help": "tokens per query block"})
    key_block: int = field(default=64, metadata={"help": "tokens per key block (one block size divides the other)"})
    top_k: int = field(default=16, metadata={"help": "key blocks kept per query block, sink and local included"})
    sink_blocks: int = field(default=1, metadata={"help": "always-kept key blocks at the start of the sequence"})
    local_blocks: int = field(default=1, metadata={"help": "always-kept key blocks ending at the diagonal"})
    estimator: str = field(default=DEFAULT_ESTIMATOR, metadata={
        "help": f"how kept blocks are chosen, one of {', '.join(ESTIMATORS)}"})
    estimator_settings: EstimatorSettings | None = field(default=None, metadata={
        "help": "the estimator's own settings (its registered dataclass); None: its defaults"})
    causal_selection: bool = field(default=True, metadata={
        "help": "strictly causal selection: a position's blocks never depend on later tokens"})
    mode: Mode = field(default="sparse", metadata={
        "help": "'sparse' runs on the sparse attention, 'observe' records it beside exact attention, "
                "'dense' runs plain dense attention"})
    keep_qk: bool = field(default=True, metadata={
        "help": "keep rotated queries and keys in the cached pattern (token-level values)"})
    observe_max_tokens: int | None = field(default=None, metadata={
        "help": "cap on the sequence length in 'observe' mode (None: no cap)"})
    backend: Literal["auto", "triton", "reference"] = field(default="auto", metadata={
        "help": "'auto' (Triton on CUDA), 'triton' or 'reference'"})

    def __post_init__(self) -> None:
        geometry = BlockGeometry(self.query_block, self.key_block, self.top_k, self.sink_blocks, self.local_blocks)
        entry = get_estimator(self.estimator)
        settings = entry.settings() if self.estimator_settings is None else self.estimator_settings
        if type(settings) is not entry.settings:
            raise InvalidConfigError(
                f"estimator={self.estimator!r} takes estimator_settings={entry.settings.__name__}(...), "
                f"got {type(settings).__name__}.")
        settings.check(geometry)
        object.__setattr__(self, "estimator_settings", settings)
        if self.mode not in MODES:
            raise InvalidConfigError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if not isinstance(self.causal_selection, bool):
            raise InvalidConfigError(f"causal_selection must be True or False, got {self.causal_selection!r}.")
        if not isinstance(self.keep_qk, bool):  # keep_qk="no" would keep them (a non-empty string is true)
            raise InvalidConfigError(f"keep_qk must be True or False, got {self.keep_qk!r}.")
        if self.causal_selection:
            causal_inner_geometry(geometry)  # InvalidConfigError: top_k too small beside the band
        if self.backend not in BACKENDS:
            raise InvalidConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.observe_max_tokens is not None and not is_int_at_least(self.observe_max_tokens, 1):
            raise InvalidConfigError(f"observe_max_tokens must be None or an int >= 1, got {self.observe_max_tokens!r}.")
        object.__setattr__(self, "_geometry", geometry)

    @property
    def geometry(self) -> BlockGeometry:
        """The block budget (query / key block, ``top_k``, sink and local blocks), validated."""
        return self._geometry

    def estimator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sparse_lens.kernels.estimate_blocks`` for this config:
        ``geometry``, ``estimator``, ``settings``, ``backend`` and ``causal``."""
        return {"geometry": self.geometry, "estimator": self.estimator, "settings": self.estimator_settings,
                "backend": self.backend, "causal": self.causal_selection}

    def replace(self, **changes: Any) -> "TracingConfig":
        """A copy with some fields changed (validated again).

        A new ``estimator`` without ``estimator_settings`` gets that estimator's defaults, keeping
        the values of the settings both estimators have (e.g. ``rescore_query_stride``). The
        former flat settings (``top_p=...``) are accepted with a ``DeprecationWarning``."""
        unknown = sorted(set(changes) - {item.name for item in fields(self)} - set(LEGACY_SETTINGS))
        if unknown:
            raise InvalidConfigError(
                f"TracingConfig has no field(s) {unknown}; its fields: {[item.name for item in fields(self)]} "
                f"(each estimator's own settings go in estimator_settings, e.g. sl.AdaptiveSettings(top_p=...)).")
        legacy = {name: changes.pop(name) for name in list(changes) if name in LEGACY_SETTINGS}
        if legacy:
            warnings.warn(_legacy_message(legacy, changes.get("estimator", self.estimator), "replace"),
                          DeprecationWarning, stacklevel=2)
        # flat settings a deprecated StreamConfig was given (remembered for estimator changes, as it did)
        flat = {**self.__dict__.get("_flat_settings", {}), **legacy}
        if legacy or ("estimator" in changes and "estimator_settings" not in changes):
            name = changes.get("estimator", self.estimator)
            own = get_estimator(name).setting_names()
            carried = {key: value for key, value in {**flat, **_fields_of(self.estimator_settings), **legacy}.items()
                       if key in own}
            changes["estimator_settings"] = settings_from_fields(name, carried)
        config = replace(self, **changes)
        if flat:
            object.__setattr__(config, "_flat_settings", flat)
        return config

    def fields_dict(self) -> dict[str, Any]:
        """The constructor's fields, shallow (``estimator_settings`` stays an object):
        ``config.replace(**other.fields_dict())`` equals ``other``."""
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The shared fields and the estimator's own settings, flat (JSON-ready)."""
        shared = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "estimator_settings"}
        return {**shared, **_fields_of(self.estimator_settings)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TracingConfig":
        """The config ``to_dict`` wrote (e.g. the ``"config"`` of a trace's summary.json): shared
        fields, and the estimator's own settings flat beside them. A setting the estimator does not
        have is refused (``InvalidConfigError``), as is a name that is neither."""
        shared_names = {item.name for item in fields(cls)} - {"estimator_settings"}
        shared = {key: value for key, value in values.items() if key in shared_names}
        flat = {key: value for key, value in values.items() if key not in shared_names}
        estimator = shared.get("estimator", DEFAULT_ESTIMATOR)
        foreign = sorted(set(flat) - set(get_estimator(estimator).setting_names()))
        if foreign:
            raise InvalidConfigError(f"TracingConfig.from_dict: {foreign} are neither shared fields nor settings of "
                                     f"estimator {estimator!r} (it takes {list(get_estimator(estimator).setting_names())}).")
        return cls(**shared, estimator_settings=settings_from_fields(estimator, flat))

    def __getattr__(self, name: str) -> Any:
        # The former flat StreamConfig fields (config.top_p, ...): deprecated, read from the settings.
        if name not in LEGACY_SETTINGS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(f"config.{name} is deprecated: read config.estimator_settings.{name} (the estimator's own "
                      "settings; the former flat field's default when the estimator has no such setting).",
                      DeprecationWarning, stacklevel=2)
        settings = self.__dict__.get("estimator_settings")
        if settings is not None and hasattr(settings, name):
            return getattr(settings, name)
        if name in self.__dict__.get("_flat_settings", {}):
            return self.__dict__["_flat_settings"][name]
        owner = next(entry.settings for entry in REGISTRY.values() if name in entry.setting_names())
        return getattr(owner(), name)


def _fields_of(settings: EstimatorSettings) -> dict[str, Any]:
    return {item.name: getattr(settings, item.name) for item in fields(settings)}


def _legacy_message(legacy: dict[str, Any], estimator: str, where: str) -> str:
    entry = get_estimator(estimator) if estimator in REGISTRY else None
    own = {key: value for key, value in legacy.items() if entry and key in entry.setting_names()}
    written = ", ".join(f"{key}={value!r}" for key, value in own.items())
    advice = (f"write estimator_settings=sl.{entry.settings.__name__}({written})" if own and entry
              else "drop them (the estimator has no such settings)")
    return (f"{where}: the flat settings {sorted(legacy)} are deprecated: {advice} "
            f"(estimator={estimator!r}; sparse_lens/kernels/registry.py lists each estimator's settings).")


class _StreamConfigAlias(type):
    """``isinstance(config, StreamConfig)`` holds for every ``TracingConfig`` (the alias builds one)."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, TracingConfig)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, TracingConfig)


@dataclass(frozen=True)
class StreamConfig(metaclass=_StreamConfigAlias):
    """Deprecated alias of ``TracingConfig`` (one release): ``StreamConfig(**fields)`` returns the
    ``TracingConfig`` those fields describe, with a ``DeprecationWarning`` that says what to write.

    Its fields are the former flat ones (so that code reading them, e.g. ``dataclasses.fields``,
    keeps working): ``TracingConfig``'s shared fields, and the estimators' settings, which go into
    the estimator's settings (``settings_from_fields``: each is validated; one the estimator does
    not have is remembered for a later ``replace(estimator=...)`` and ``config.<name>``, as the
    flat config kept it).

    Attributes:
        query_block: Tokens per query block (``TracingConfig.query_block``).
        key_block: Tokens per key block (``TracingConfig.key_block``).
        top_k: Key blocks kept per query block, sink and local blocks included (``TracingConfig.top_k``).
        sink_blocks: Always-kept key blocks at the start (``TracingConfig.sink_blocks``).
        local_blocks: Always-kept key blocks ending at the diagonal (``TracingConfig.local_blocks``).
        estimator: The estimator's name (``TracingConfig.estimator``).
        representative_keys: Now ``StreamSettings`` / ``RescoredSettings`` / ``AdaptiveSettings.representative_keys``.
        beam: Now ``RescoredSettings.beam``.
        rescore_search: Now ``RescoredSettings`` / ``AdaptiveSettings.rescore_search``.
        rescore_query_stride: Now ``RescoredSettings`` / ``AdaptiveSettings.rescore_query_stride``.
        top_p: Now ``AdaptiveSettings.top_p``.
        min_blocks: Now ``AdaptiveSettings.min_blocks``.
        antidiagonal_stride: Now ``AntidiagonalSettings.antidiagonal_stride``.
        causal_selection: Strictly causal selection (``TracingConfig.causal_selection``).
        mode: ``"sparse"``, ``"observe"`` or ``"dense"`` (``TracingConfig.mode``).
        keep_qk: Keep rotated queries and keys in the pattern (``TracingConfig.keep_qk``).
        observe_max_tokens: Cap on the length in observe mode (``TracingConfig.observe_max_tokens``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (``TracingConfig.backend``).
    """

    query_block: int = field(default=64, metadata={"help": "tokens per query block"})
    key_block: int = field(default=64, metadata={"help": "tokens per key block"})
    top_k: int = field(default=16, metadata={"help": "key blocks kept per query block, sink and local included"})
    sink_blocks: int = field(default=1, metadata={"help": "always-kept key blocks at the start"})
    local_blocks: int = field(default=1, metadata={"help": "always-kept key blocks ending at the diagonal"})
    estimator: str = field(default=DEFAULT_ESTIMATOR, metadata={"help": f"one of {', '.join(ESTIMATORS)}"})
    representative_keys: int = field(default=8, metadata={"help": "'stream', 'rescored', 'adaptive': keys per branch"})
    beam: int = field(default=4, metadata={"help": "'rescored': candidates as a multiple of the searched slots"})
    rescore_search: str = field(default="stream", metadata={"help": "'rescored' / 'adaptive': the candidate search"})
    rescore_query_stride: int = field(default=1, metadata={"help": "'rescored' / 'adaptive': every n-th query"})
    top_p: float = field(default=0.93, metadata={"help": "'adaptive': estimated mass each row keeps"})
    min_blocks: int = field(default=4, metadata={"help": "'adaptive': fewest key blocks a row keeps"})
    antidiagonal_stride: int = field(default=8, metadata={"help": "'antidiagonal': stride of the antidiagonals"})
    causal_selection: bool = field(default=True, metadata={"help": "strictly causal selection"})
    mode: Mode = field(default="sparse", metadata={"help": "'sparse', 'observe' or 'dense'"})
    keep_qk: bool = field(default=True, metadata={"help": "keep rotated queries and keys in the pattern"})
    observe_max_tokens: int | None = field(default=None, metadata={"help": "cap on the length in 'observe' mode"})
    backend: Literal["auto", "triton", "reference"] = field(default="auto", metadata={"help": "kernel backend"})

    def __new__(cls, *args: Any, **fields_: Any) -> TracingConfig:  # type: ignore[misc]
        fields_.update(zip((item.name for item in fields(cls)), args))
        legacy = {name: fields_.pop(name) for name in list(fields_) if name in LEGACY_SETTINGS}
        estimator = fields_.get("estimator", DEFAULT_ESTIMATOR)
        message = "sl.StreamConfig is deprecated: write sl.TracingConfig (same shared fields)"
        if legacy:
            message += "; " + _legacy_message(legacy, estimator, "StreamConfig")
        warnings.warn(message if legacy else message + ".", DeprecationWarning, stacklevel=2)
        if not legacy:
            return TracingConfig(**fields_)
        config = TracingConfig(**fields_, estimator_settings=settings_from_fields(estimator, legacy))
        object.__setattr__(config, "_flat_settings", legacy)  # read back by replace(estimator=...) and config.top_p
        return config
