"""StreamConfig: the knobs of Sparse Tracing, validated once, immutable afterwards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from sparse_lens.errors import BlockSizeError, InvalidConfigError

Mode = Literal["sparse", "observe"]


@dataclass(frozen=True)
class StreamConfig:
    """How every attention layer estimates and uses its block-sparse pattern.

    Attributes:
        query_block: Tokens per query block (rows of the block pattern).
        key_block: Tokens per key block (columns). One of the two block sizes must divide
            the other so that block grids line up.
        top_k: Key blocks kept per query block, sink and local blocks included. A query block
            that sees ``top_k`` causal key blocks or fewer keeps all of them.
        sink_blocks: Always-kept key blocks at the start of the sequence.
        local_blocks: Always-kept key blocks ending at the query block's diagonal. With
            ``key_block < query_block`` use ``local_blocks >= query_block // key_block`` so that
            every query sees its own position.
        representative_keys: Keys the estimator reads to score a candidate branch (evenly
            strided keys of the branch's centre block); ``key_block`` reads the whole block.
            Estimation cost is proportional to it.
        mode: ``"sparse"``: the model runs on the sparse attention (downstream activations
            change). ``"observe"``: the model runs exact dense attention (chunked, quadratic
            time) and the sparse estimate is recorded beside it.
        keep_qk: Keep each layer's rotated queries and keys inside the cached pattern so that
            token-level values can be recomputed (``BlockSparsePattern.to_dense``). Costs
            O(T * d_head) per head; turn off for very long contexts.
        observe_max_tokens: Longest sequence accepted in ``"observe"`` mode, whose dense
            attention takes time quadratic in the length.
        backend: Kernel implementation: ``"auto"`` (Triton on CUDA tensors, the torch reference
            elsewhere), ``"triton"`` or ``"reference"`` to force one.
    """

    query_block: int = 64
    key_block: int = 64
    top_k: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    representative_keys: int = 8
    mode: Mode = "sparse"
    keep_qk: bool = True
    observe_max_tokens: int = 65_536
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
        if self.mode not in ("sparse", "observe"):
            raise InvalidConfigError(f"mode must be 'sparse' or 'observe', got {self.mode!r}.")
        if self.backend not in ("auto", "triton", "reference"):
            raise InvalidConfigError(f"backend must be 'auto', 'triton' or 'reference', got {self.backend!r}.")
        if self.observe_max_tokens < 1:
            raise InvalidConfigError("observe_max_tokens must be >= 1.")

    def estimator_kwargs(self) -> dict:
        """Keyword arguments of ``sparse_lens.kernels.stream_estimate`` for this config."""
        return {
            "query_block": self.query_block,
            "key_block": self.key_block,
            "top_k": self.top_k,
            "sink_blocks": self.sink_blocks,
            "local_blocks": self.local_blocks,
            "representative_keys": self.representative_keys,
            "backend": self.backend,
        }

    def replace(self, **changes) -> "StreamConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
