"""BlockSparsePattern: what ``hook_pattern`` carries in sparse_lens instead of a dense T x T tensor.

One pattern per attention layer, covering every query head. Its primary content is compact:
``block_indices`` and ``block_mass``, [batch, head, n_query_blocks, top_k] each, so a layer at
1M tokens with 64-token blocks and top_k=16 costs ~2 MB per head instead of ~2 TB dense.
Token-level values are recomputed on demand from the rotated queries and keys it keeps
(``StreamConfig.keep_qk``) and the exact softmax normaliser ``lse``.

It quacks like a tensor where TransformerLens' ``ActivationCache`` needs it to: ``detach``,
``to``, ``cpu``, ``clone``, ``dim``/``ndim``/``shape``/``size``, ``squeeze(0)``/``unsqueeze(0)``,
indexing the batch axis (``remove_batch_dim``, ``apply_slice_to_batch_dim``) and the query axis
(``run_with_cache(pos_slice=...)`` keeps the query blocks that hold the selected positions), and
``torch.stack`` (``stack_activation``; see :mod:`sparse_lens.pattern_stack`). Indexing heads or
keys, or writing entries, are dense-tensor operations and raise ``DensePatternRequiredError``.

**Batch dimension.** ``pattern[0]`` (what ``remove_batch_dim`` and an int batch slice do) gives
a pattern with ``has_batch_dim=False`` whose tensors lost their batch axis: ``block_indices``
[head, n_query_blocks, top_k], ``lse`` [head, seq], ``query`` [head, seq, d_head], and
``shape`` [head, seq, seq], as a TransformerLens pattern without batch dimension.
``unsqueeze(0)`` restores it. Methods work in both layouts.

FlexAttention names: ``kv_num_blocks``, ``kv_indices``, ``BLOCK_SIZE``, ``to_block_mask()``,
``to_string()``.

Where the code lives: this module holds the dataclass (its fields, sizes and edits); its methods
are grouped by concern in mixins: :mod:`~sparse_lens.pattern.tensor_protocol` (``detach``, ``to``,
``torch.stack``, ...), :mod:`~sparse_lens.pattern.indexing` (``pattern[...]``),
:mod:`~sparse_lens.pattern.counting` (``recall``, ``kept_pairs``, ``pruned_fraction``),
:mod:`~sparse_lens.pattern.block_mask` (FlexAttention vocabulary) and
:mod:`~sparse_lens.pattern.token_level` (``token_probs``, ``sink_probs``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import IncompletePatternError, ShapeError
from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.checks import check_attention_features
from sparse_lens.pattern.block_mask import PatternFlexVocabulary
from sparse_lens.pattern.counting import PatternCounting
from sparse_lens.pattern.indexing import PatternIndexing
from sparse_lens.pattern.tensor_protocol import PatternTensorProtocol
from sparse_lens.pattern.token_level import DEFAULT_DENSE_LIMIT, PatternTokenLevel
from sparse_lens.pattern_edits import normalize_block_indices

__all__ = ["DEFAULT_DENSE_LIMIT", "BlockSparsePattern"]


@dataclass(frozen=True, eq=False)
class BlockSparsePattern(
    PatternTensorProtocol, PatternIndexing, PatternCounting, PatternFlexVocabulary, PatternTokenLevel,
):
    """Kept key blocks of one layer and the attention mass they receive.

    Attributes:
        block_indices: int64 [batch, head, n_query_blocks, top_k]; ascending kept key blocks,
            ``-1`` marks an unused slot (query blocks that see fewer than top_k key blocks).
        block_mass: float32, same shape: attention probability each kept block receives,
            averaged over the query block's queries. In ``"sparse"`` mode a row sums to 1;
            in ``"observe"`` mode it is the dense mass, so a row sums to its recall.
        lse: float32 [batch, head, seq]: log of the softmax normaliser of each query (sparse
            in sparse mode, dense in observe mode).
        seq_len, query_block, key_block, scale: geometry and the softmax scale.
        mode: ``"sparse"`` or ``"observe"``.
        query, key: rotated queries [batch, head, seq, d_head] and keys [batch, kv_head, seq,
            d_head], kept for token-level values; ``None`` when ``keep_qk=False``.
        block_gate: optional float [batch, head, n_query_blocks, top_k] multiplying each kept
            block's probabilities in the output (attribution and suppression experiments).
        first_query_block: index of the first row when the pattern was sliced along queries.
        has_batch_dim: ``False`` after ``pattern[0]`` / ``remove_batch_dim``: every tensor above
            then lacks its leading batch axis.
        window, softcap, sinks: the layer's sliding window (tokens; query i sees key j iff
            ``i - window < j <= i``), logit soft-cap (``softcap * tanh(s / softcap)``) and
            per-head sink logits (float [head], no batch axis: part of each query's normaliser,
            so ``lse`` includes them); ``None`` for a plain layer. ``token_probs`` applies them.
    """

    block_indices: Int[Tensor, "batch head n_query_blocks top_k"]
    block_mass: Float[Tensor, "batch head n_query_blocks top_k"]
    lse: Float[Tensor, "batch head seq"]
    seq_len: int
    query_block: int
    key_block: int
    scale: float
    mode: Literal["sparse", "observe"] = "sparse"
    query: Float[Tensor, "batch head seq d_head"] | None = None
    key: Float[Tensor, "batch kv_head seq d_head"] | None = None
    block_gate: Float[Tensor, "batch head n_query_blocks top_k"] | None = None
    first_query_block: int = 0
    has_batch_dim: bool = True
    window: int | None = None
    softcap: float | None = None
    sinks: Float[Tensor, "head"] | None = None

    def __post_init__(self) -> None:
        rank = 4 if self.has_batch_dim else 3
        if self.block_indices.dim() != rank or self.block_mass.shape != self.block_indices.shape:
            layout = "[batch, head, n_query_blocks, top_k]" if self.has_batch_dim else "[head, n_query_blocks, top_k]"
            raise ShapeError(
                f"block_indices {tuple(self.block_indices.shape)} and block_mass "
                f"{tuple(self.block_mass.shape)} must both be {layout}."
            )
        if self.block_gate is not None and self.block_gate.shape != self.block_indices.shape:
            raise ShapeError(f"block_gate must have shape {tuple(self.block_indices.shape)}.")
        check_attention_features(self.window, self.softcap, self.sinks, self.block_indices.shape[-3])

    # ----- sizes ---------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self.block_indices.shape[-1]

    @property
    def n_query_blocks(self) -> int:
        """Rows held (fewer than the sequence has if the pattern was sliced)."""
        return self.block_indices.shape[-2]

    @property
    def is_sliced(self) -> bool:
        return self.first_query_block != 0 or self.n_query_blocks != num_blocks(self.seq_len, self.query_block)

    def require_whole(self, method: str) -> None:
        """``IncompletePatternError`` if this pattern was sliced along queries (``method`` needs every row)."""
        if self.is_sliced:
            raise IncompletePatternError(f"{method} needs the whole pattern; this one was sliced along queries.")

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense pattern this stands for: [batch, head, seq, seq] ([head, seq, seq]
        without batch dimension)."""
        return torch.Size([*self.block_indices.shape[:-2], self.seq_len, self.seq_len])

    def size(self, dim: int | None = None) -> torch.Size | int:
        """``shape``, or its entry ``dim``, as ``Tensor.size``."""
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return 4 if self.has_batch_dim else 3

    def dim(self) -> int:
        return self.ndim

    @property
    def requires_grad(self) -> bool:
        """Whether the block mass or gate carries gradients."""
        return any(t is not None and t.requires_grad for t in (self.block_mass, self.block_gate))

    @property
    def device(self) -> torch.device:
        return self.block_indices.device

    def nbytes(self, include_qk: bool = False) -> int:
        """Bytes held by the pattern's tensors (the compact part, plus q/k if asked)."""
        tensors = [self.block_indices, self.block_mass, self.lse, self.block_gate]
        if include_qk:
            tensors += [self.query, self.key]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ----- edits ---------------------------------------------------------------------------
    def with_block_indices(
        self, block_indices: Int[Tensor, "batch head n_query_blocks top_k"]
    ) -> "BlockSparsePattern":
        """A pattern keeping other blocks (e.g. a knockout). Returned from a ``hook_pattern`` hook in
        sparse mode, the layer recomputes its attention over these blocks (after
        :meth:`validated`'s checks; rows may be in any order, ``-1`` anywhere)."""
        return replace(self, block_indices=block_indices)

    def with_gate(self, block_gate: Float[Tensor, "batch head n_query_blocks top_k"]) -> "BlockSparsePattern":
        """A pattern whose kept blocks are scaled by ``block_gate`` in the layer's output."""
        return replace(self, block_gate=block_gate)

    def validated(self) -> "BlockSparsePattern":
        """This pattern with its rows checked and sorted (``-1`` last, the gate permuted alike).

        What the attention layer does to an edited pattern (see :mod:`sparse_lens.pattern_edits`).

        Raises:
            InvalidPatternError: a block out of range, repeated, not causal, or a query left
                with no visible key.
        """
        batched = self._batched()
        indices, gate = normalize_block_indices(
            batched.block_indices, seq_len=self.seq_len, query_block=self.query_block, key_block=self.key_block,
            first_query_block=self.first_query_block, block_gate=batched.block_gate,
        )
        if not self.has_batch_dim:
            indices, gate = indices[0], None if gate is None else gate[0]
        return replace(self, block_indices=indices, block_gate=gate)

    def __repr__(self) -> str:
        *lead, rows, top_k = self.block_indices.shape
        batch = lead[0] if self.has_batch_dim else "removed"
        return (
            f"BlockSparsePattern(mode={self.mode!r}, batch={batch}, heads={lead[-1]}, seq_len={self.seq_len}, "
            f"query_block={self.query_block}, key_block={self.key_block}, top_k={top_k}, rows={rows})"
        )
