"""BlockSparsePattern: what ``hook_pattern`` carries in sparse_lens instead of a dense T x T tensor.

One pattern per attention layer, covering every query head. Its primary content is compact:
``block_indices`` and ``block_mass``, [batch, head, n_query_blocks, top_k] each, so a layer at
1M tokens with 64-token blocks and top_k=16 costs ~2 MB per head instead of ~2 TB dense.
Token-level values are recomputed on demand from the rotated queries and keys it keeps
(``StreamConfig.keep_qk``) and the exact softmax normaliser ``lse``.

It quacks like a tensor where TransformerLens needs it to: ``detach``, ``to``, ``clone``,
``dim``/``ndim``/``shape`` and slicing of the query axis (``run_with_cache(pos_slice=...)``
keeps the query blocks that hold the selected positions).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import ContextTooLongError, ShapeError
from sparse_lens.kernels.blocks import causal_pairs, kept_pairs_per_slot, num_blocks
from sparse_lens.kernels.sparse_attention_ref import kept_token_probs

DEFAULT_DENSE_LIMIT = 4096


@dataclass(frozen=True, eq=False)
class BlockSparsePattern:
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

    def __post_init__(self) -> None:
        if self.block_indices.dim() != 4 or self.block_mass.shape != self.block_indices.shape:
            raise ShapeError(
                f"block_indices {tuple(self.block_indices.shape)} and block_mass "
                f"{tuple(self.block_mass.shape)} must both be [batch, head, n_query_blocks, top_k]."
            )
        if self.block_gate is not None and self.block_gate.shape != self.block_indices.shape:
            raise ShapeError(f"block_gate must have shape {tuple(self.block_indices.shape)}.")

    # ----- sizes ---------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self.block_indices.shape[-1]

    @property
    def n_query_blocks(self) -> int:
        """Rows held (fewer than the sequence has if the pattern was sliced)."""
        return self.block_indices.shape[2]

    @property
    def is_sliced(self) -> bool:
        return self.first_query_block != 0 or self.n_query_blocks != num_blocks(self.seq_len, self.query_block)

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense pattern this stands for: [batch, head, seq, seq]."""
        batch, heads = self.block_indices.shape[:2]
        return torch.Size([batch, heads, self.seq_len, self.seq_len])

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    @property
    def device(self) -> torch.device:
        return self.block_indices.device

    def nbytes(self, include_qk: bool = False) -> int:
        """Bytes held by the pattern's tensors (the compact part, plus q/k if asked)."""
        tensors = [self.block_indices, self.block_mass, self.lse, self.block_gate]
        if include_qk:
            tensors += [self.query, self.key]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ----- tensor-like protocol used by TransformerLens' cache ------------------------------
    def _map_tensors(self, fn) -> "BlockSparsePattern":
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def detach(self) -> "BlockSparsePattern":
        return self._map_tensors(Tensor.detach)

    def to(self, *args, **kwargs) -> "BlockSparsePattern":
        """Move every tensor (``to(device)``); dtype casts apply to float tensors only."""
        return self._map_tensors(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else t.to(
            *[a for a in args if not isinstance(a, torch.dtype)],
            **{k: v for k, v in kwargs.items() if k != "dtype"},
        ))

    def clone(self) -> "BlockSparsePattern":
        return self._map_tensors(Tensor.clone)

    def cpu(self) -> "BlockSparsePattern":
        return self.to("cpu")

    def __getitem__(self, index) -> "BlockSparsePattern":
        """Slice the query axis (dim 2 or -2) in token positions, as ``pos_slice`` does.

        Keeps the contiguous run of query blocks spanning the selected positions (an int, a
        slice, or a sequence of ints); batch, head and key axes must be ``:``.
        """
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (4 - len(index))
        batch_sel, head_sel, query_sel, key_sel = index
        if any(sel != slice(None) for sel in (batch_sel, head_sel, key_sel)):
            raise IndexError("A BlockSparsePattern can only be sliced along its query axis (dim 2).")
        if isinstance(query_sel, slice):
            positions = list(range(self.seq_len)[query_sel])
        else:  # an int, or a list / array / tensor of ints (TransformerLens' Slice gives arrays)
            positions = [int(p) % self.seq_len for p in torch.as_tensor(query_sel).flatten().tolist()]
        if not positions:
            raise IndexError("Empty query selection.")
        first_pos, last_pos = min(positions), max(positions)
        first_row = first_pos // self.query_block - self.first_query_block
        last_row = last_pos // self.query_block - self.first_query_block
        if first_row < 0 or last_row >= self.n_query_blocks:
            raise IndexError("Query positions outside the rows this pattern holds.")
        rows = slice(first_row, last_row + 1)
        return replace(
            self,
            block_indices=self.block_indices[:, :, rows],
            block_mass=self.block_mass[:, :, rows],
            block_gate=None if self.block_gate is None else self.block_gate[:, :, rows],
            first_query_block=self.first_query_block + first_row,
        )

    # ----- summaries ------------------------------------------------------------------------
    def recall(self) -> Float[Tensor, "batch head n_query_blocks"]:
        """Attention mass kept per query block: 1 in sparse mode, the dense recall in observe mode."""
        return self.block_mass.sum(-1)

    def kept_pairs(self) -> Int[Tensor, "batch head"]:
        """Causal query-key pairs covered by the kept blocks, per head (rows held only)."""
        full = torch.full(
            (*self.block_indices.shape[:2], self.first_query_block, self.top_k), -1,
            dtype=self.block_indices.dtype, device=self.device,
        )
        pairs = kept_pairs_per_slot(
            torch.cat([full, self.block_indices], dim=2), self.seq_len, self.query_block, self.key_block
        )
        return pairs.sum(dim=(-1, -2))

    def pruned_fraction(self) -> float:
        """``1 - kept query-key pairs / causal pairs``, over every batch row and head."""
        if self.is_sliced:
            raise ValueError("pruned_fraction needs the whole pattern; this one was sliced along queries.")
        heads = self.block_indices.shape[0] * self.block_indices.shape[1]
        return 1.0 - float(self.kept_pairs().sum()) / (causal_pairs(self.seq_len) * heads)

    def with_block_indices(
        self, block_indices: Int[Tensor, "batch head n_query_blocks top_k"]
    ) -> "BlockSparsePattern":
        """A pattern keeping other blocks (e.g. a knockout). Returned from a ``hook_pattern`` hook in
        sparse mode, the layer recomputes its attention over these blocks."""
        return replace(self, block_indices=block_indices)

    def with_gate(self, block_gate: Float[Tensor, "batch head n_query_blocks top_k"]) -> "BlockSparsePattern":
        """A pattern whose kept blocks are scaled by ``block_gate`` in the layer's output."""
        return replace(self, block_gate=block_gate)

    def to_dense(self, max_tokens: int = DEFAULT_DENSE_LIMIT) -> Float[Tensor, "batch head seq seq"]:
        """Token-level pattern [batch, head, seq, seq]: ``exp(q.k * scale - lse)`` on kept entries, 0 elsewhere.

        In sparse mode this is the softmax the model actually used; in observe mode the dense
        probabilities restricted to the kept blocks. Raises ``ContextTooLongError`` above
        ``max_tokens`` (the tensor is quadratic in the sequence length).
        """
        if self.seq_len > max_tokens:
            raise ContextTooLongError(
                f"to_dense would build a [{self.shape[0]}, {self.shape[1]}, {self.seq_len}, "
                f"{self.seq_len}] tensor; the limit is max_tokens={max_tokens}. Use block_mass, or "
                "run a window of the sequence, or raise max_tokens if you have the memory."
            )
        if self.query is None or self.key is None:
            raise ValueError("This pattern kept no queries/keys (StreamConfig.keep_qk=False); to_dense needs them.")
        if self.is_sliced:
            raise ValueError("to_dense needs the whole pattern; this one was sliced along queries.")
        return kept_token_probs(
            self.query, self.key, self.block_indices, self.lse,
            query_block=self.query_block, key_block=self.key_block, scale=self.scale,
        )

    def __repr__(self) -> str:
        batch, heads, rows, top_k = self.block_indices.shape
        return (
            f"BlockSparsePattern(mode={self.mode!r}, batch={batch}, heads={heads}, seq_len={self.seq_len}, "
            f"query_block={self.query_block}, key_block={self.key_block}, top_k={top_k}, rows={rows})"
        )
