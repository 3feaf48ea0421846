"""StreamConfig: the knobs of Sparse Tracing, validated once, immutable afterwards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from sparse_lens.errors import BlockSizeError, InvalidConfigError

Mode = Literal["sparse", "observe", "dense"]
MODES = ("sparse", "observe", "dense")
# Names of sparse_lens.kernels.estimate.ESTIMATORS (kept here so that config imports no kernel).
ESTIMATORS = ("rescored", "adaptive", "stream", "bounds", "pooled", "oneshot_pooled", "antidiagonal", "oracle")


@dataclass(frozen=True)
class StreamConfig:
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
        estimator: How kept blocks are chosen (``sparse_lens.kernels.estimate``):
            ``"rescored"`` (default: a bounds search keeping ``beam`` x the blocks, then exact
            block masses of those candidates pick the heaviest; measured closest to the exact
            top-k oracle, see docs/fidelity.md), ``"adaptive"`` (the same candidates, keeping per
            row the fewest whose mass reaches ``top_p``), ``"stream"`` (the paper's estimator,
            with a Triton kernel), and the comparison baselines ``"bounds"``, ``"pooled"``,
            ``"oneshot_pooled"``, ``"antidiagonal"``; ``"oracle"`` keeps the exact top-k blocks by
            dense block mass (the ceiling, O(T^2) time: for measurement).
        representative_keys: ``"stream"``: keys read to score a candidate branch (evenly
            strided keys of the branch's centre block); ``key_block`` reads the whole block.
            Estimation cost is proportional to it.
        beam: ``"rescored"``: candidates kept by the search, as a multiple of the searched slots.
        rescore_search: ``"rescored"`` / ``"adaptive"``: how candidates are found, ``"stream"``
            (Stream's search; with ``rescore_query_stride=1`` the whole estimator runs on the
            Triton kernels) or ``"bounds"`` (Quest-style key min / max bounds; torch only,
            slightly closer to the oracle at small top_k).
        rescore_query_stride: ``"rescored"`` / ``"adaptive"``: the exact candidate masses are
            computed on every n-th query of a block (cost proportional to 1 / n).
        top_p: ``"adaptive"``: estimated attention mass each row keeps.
        min_blocks: ``"adaptive"``: fewest key blocks a row keeps.
        antidiagonal_stride: ``"antidiagonal"``: stride of the scored antidiagonals.
        causal_selection: Strictly causal selection (``kernels/causal.py``): query block
            ``b`` keeps the key blocks the estimator chose for the query block before it plus the
            ``ceil(query_block / key_block)`` key blocks overlapping ``b`` (the estimator runs with
            that many fewer blocks), so what a position reads never depends on later tokens.
            ``False``: each query block's own queries choose its blocks, so changing token
            ``p + 1`` can change the output at ``p`` (docs/concepts.md, "Causality of the selection").
        mode: ``"sparse"``: the model runs on the sparse attention (downstream activations
            change). ``"observe"``: the model runs exact dense attention (flash kernels with
            their log-sum-exp on the GPU, O(T) memory, quadratic time) and the sparse estimate
            is recorded beside it. ``"dense"``: plain dense causal
            attention (torch SDPA), no estimate and no ``hook_pattern``: the fast baseline for
            comparisons (task accuracy, patching references).
        keep_qk: Keep each layer's rotated queries and keys inside the cached pattern so that
            token-level values can be recomputed (``BlockSparsePattern.token_probs``). Costs
            O(T * d_head) per head; turn off for very long contexts.
        observe_max_tokens: Optional cap on the sequence length in ``"observe"`` mode (None, the
            default: no cap). Observe mode's dense attention is O(T) in memory (flash kernels on
            the GPU, chunked elsewhere) and quadratic only in time; an input whose estimated
            memory exceeds what the device has free raises ``ContextTooLongError`` either way.
        backend: Kernel implementation: ``"auto"`` (Triton on CUDA tensors, the torch reference
            elsewhere), ``"triton"`` or ``"reference"`` to force one.
    """

    query_block: int = 64
    key_block: int = 64
    top_k: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    estimator: str = "rescored"
    representative_keys: int = 8
    beam: int = 4
    rescore_search: str = "stream"
    rescore_query_stride: int = 1
    top_p: float = 0.93
    min_blocks: int = 4
    antidiagonal_stride: int = 8
    causal_selection: bool = True
    mode: Mode = "sparse"
    keep_qk: bool = True
    observe_max_tokens: int | None = None
    backend: Literal["auto", "triton", "reference"] = "auto"

    def __post_init__(self) -> None:
        for name in ("query_block", "key_block"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 1:
                raise BlockSizeError(f"{name} must be a positive int, got {size!r}.")
        if self.query_block % self.key_block and self.key_block % self.query_block:
            raise BlockSizeError(
                f"query_block={self.query_block} and key_block={self.key_block}: one must divide "
                "the other so that query and key block grids line up (e.g. 64 and 64, or 64 and 16)."
            )
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidConfigError(f"top_k counts kept key blocks and must be >= 1, got {self.top_k!r}.")
        for name in ("sink_blocks", "local_blocks"):
            count = getattr(self, name)
            if not isinstance(count, int) or count < 0:
                raise InvalidConfigError(f"{name} must be an int >= 0, got {count!r}.")
        if self.sink_blocks + self.local_blocks > self.top_k:
            raise InvalidConfigError(
                f"sink_blocks + local_blocks = {self.sink_blocks + self.local_blocks} exceeds "
                f"top_k = {self.top_k}: they are counted inside top_k."
            )
        if not isinstance(self.representative_keys, int) or not 1 <= self.representative_keys <= self.key_block:
            raise InvalidConfigError(
                f"representative_keys must be between 1 and key_block={self.key_block}, got {self.representative_keys!r}."
            )
        if self.mode not in MODES:
            raise InvalidConfigError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.estimator not in ESTIMATORS:
            raise InvalidConfigError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}.")
        for name in ("beam", "rescore_query_stride", "antidiagonal_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be an int >= 1, got {value!r}.")
        if self.rescore_search not in ("stream", "bounds", "pooled"):
            raise InvalidConfigError(f"rescore_search must be 'stream', 'bounds' or 'pooled', got {self.rescore_search!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidConfigError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.min_blocks, int) or self.min_blocks < 1:
            raise InvalidConfigError(f"min_blocks must be an int >= 1, got {self.min_blocks!r}.")
        if self.estimator == "adaptive" and self.min_blocks > self.top_k:
            raise InvalidConfigError(
                f"estimator='adaptive' keeps between min_blocks={self.min_blocks} and top_k={self.top_k} "
                "blocks per row: min_blocks must not exceed top_k."
            )
        if not isinstance(self.causal_selection, bool):
            raise InvalidConfigError(f"causal_selection must be True or False, got {self.causal_selection!r}.")
        band = -(-self.query_block // self.key_block)  # key blocks overlapping a query block
        inner_top_k, inner_local = self.top_k - band, max(self.local_blocks - band, 0)
        if self.causal_selection and inner_top_k < max(1, self.sink_blocks + inner_local):
            raise InvalidConfigError(
                f"causal_selection=True always keeps the {band} key block(s) overlapping each query block and "
                f"chooses the rest with top_k - {band} = {inner_top_k} blocks, which must hold at least one block "
                f"and the sink_blocks={self.sink_blocks} (+ {inner_local} more local): raise top_k to "
                f"{band + max(1, self.sink_blocks + inner_local)} or set causal_selection=False."
            )
        if self.backend not in ("auto", "triton", "reference"):
            raise InvalidConfigError(f"backend must be 'auto', 'triton' or 'reference', got {self.backend!r}.")
        if self.observe_max_tokens is not None and (
            not isinstance(self.observe_max_tokens, int) or self.observe_max_tokens < 1
        ):
            raise InvalidConfigError(f"observe_max_tokens must be None or an int >= 1, got {self.observe_max_tokens!r}.")

    def estimator_kwargs(self) -> dict:
        """Keyword arguments of ``sparse_lens.kernels.estimate_blocks`` for this config."""
        names = ("estimator", "query_block", "key_block", "top_k", "sink_blocks", "local_blocks",
                 "representative_keys", "beam", "rescore_search", "rescore_query_stride", "top_p", "min_blocks",
                 "antidiagonal_stride", "backend")
        return {**{name: getattr(self, name) for name in names}, "causal": self.causal_selection}

    def replace(self, **changes) -> "StreamConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
