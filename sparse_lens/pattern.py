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
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import ContextTooLongError, DensePatternMethodError, DensePatternRequiredError, ShapeError
from sparse_lens.kernels.blocks import causal_pairs, kept_pairs_per_slot, num_blocks
from sparse_lens.kernels.checks import check_attention_features
from sparse_lens.kernels.sparse_attention import kept_token_probs
from sparse_lens.pattern_edits import normalize_block_indices
from sparse_lens.pattern_flex import DEFAULT_BLOCK_MASK_BYTES, block_grid, block_mask_from_indices

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

DEFAULT_DENSE_LIMIT = 4096

_DENSE_ONLY = (
    "A BlockSparsePattern is not a dense [batch, head, query, key] tensor: {what}. This is what "
    "transformer_lens.patching's get_act_patch_attn_head_pattern_* helpers (and generic_activation_patch "
    "on hook_pattern) do; they do not apply to sparse attention (for the *_every helpers, "
    "sparse_lens.tl.patching refuses that sweep before the others run). Instead: patch blocks.{{l}}.attn."
    "hook_block_indices (a plain tensor hook: TL's patching and caching work on it), return "
    "pattern.with_block_indices(...) / pattern.with_gate(...) from a hook_pattern hook, use "
    "sparse_lens.analysis (block_attribution, suppress_span, path_patch), or pattern.token_probs() "
    "for token-level values on short inputs."
)

# Public names of torch.Tensor: read on a pattern (which lacks them) they raise DensePatternMethodError.
_TENSOR_NAMES = frozenset(name for name in dir(Tensor) if not name.startswith("_"))


def _not_a_tensor(what: str, example: str) -> str:
    """The message of ``torch.f(pattern)`` and ``pattern.f()``: ``what`` does not apply, use ``example``."""
    return (f"{what} does not apply to a BlockSparsePattern (block indices and masses, not a dense "
            "[batch, head, query, key] tensor). Use its tensors (pattern.block_mass, pattern.block_indices: "
            f"e.g. {example}), its summaries (recall(), kept_pairs(), pruned_fraction()), "
            "pattern.token_probs(...) for token-level values on short inputs, or torch.stack(patterns).")


def _full(selection: Any) -> bool:
    return isinstance(selection, slice) and selection == slice(None)


def _index_tensor(selection: Any, size: int, what: str) -> Int[Tensor, "n"]:
    """int64 indices of an int / sequence of ints / bool mask along an axis of ``size`` entries, as
    torch would read them: ``IndexError`` for an index outside ``[-size, size)``, a non-integer
    index, or a mask of another length (``% size`` or ``int()`` would pick a wrong entry silently)."""
    index = torch.as_tensor(selection)
    if index.numel() == 0:
        return index.to(torch.long).flatten()
    if index.dtype == torch.bool:
        if index.dim() != 1 or index.numel() != size:
            raise IndexError(f"a bool mask over the {what} needs {size} entries, got shape {tuple(index.shape)}.")
        return index.nonzero().flatten()
    if index.is_floating_point() or index.is_complex():
        raise IndexError(f"{what} must be integers, got {index.dtype}.")
    index = index.to(torch.long).flatten()
    if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
        raise IndexError(f"{what} out of range: {index.tolist()[:8]} for an axis of {size}.")
    return index


def _pairs_per_slot_before(
    block_indices: Int[Tensor, "*batch n_query_blocks top_k"], seq_len: int, query_block: int, key_block: int,
    offset: int,
) -> Int[Tensor, "*batch n_query_blocks top_k"]:
    """Pairs (query ``t``, key ``s``) of each kept slot with ``s <= t - offset`` (those a window of
    ``offset`` tokens hides): ``kept_pairs_per_slot``'s closed form with the queries shifted back
    by ``offset``, ``clamp(min(t - offset, k_last) - k_first + 1, 0)`` keys per query."""
    q_first = torch.arange(block_indices.shape[-2], device=block_indices.device, dtype=torch.int64) * query_block
    q_last = (torch.clamp(q_first + query_block, max=seq_len) - 1 - offset)[:, None]
    q_first = (q_first - offset)[:, None]
    k_first = block_indices.clamp(min=0).to(torch.int64) * key_block
    k_last = torch.clamp(k_first + key_block, max=seq_len) - 1
    ramp_first, ramp_last = torch.maximum(q_first, k_first), torch.minimum(q_last, k_last)
    ramp_len = (ramp_last - ramp_first + 1).clamp(min=0)
    ramp_pairs = ramp_len * ((ramp_first - k_first + 1) + (ramp_last - k_first + 1)) // 2
    full_pairs = (q_last - torch.maximum(q_first, k_last + 1) + 1).clamp(min=0) * (k_last - k_first + 1)
    return torch.where(block_indices >= 0, ramp_pairs + full_pairs, torch.zeros_like(ramp_pairs))


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

    # ----- tensor-like protocol used by TransformerLens' cache ------------------------------
    def _map_tensors(self, fn, batch_axis: bool = False, **other_changes: Any) -> "BlockSparsePattern":
        """Apply ``fn`` to every tensor field; ``batch_axis=True`` (fn acts on the batch axis) skips
        the per-head ``sinks``, which have none."""
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor) and not (batch_axis and f.name == "sinks")
        }
        return replace(self, **changes, **other_changes)

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

    def squeeze(self, dim: int = 0) -> "BlockSparsePattern":
        """Drop a batch axis of size 1 (``dim=0`` only); unchanged otherwise, as ``Tensor.squeeze``."""
        if dim != 0:
            raise DensePatternRequiredError(_DENSE_ONLY.format(what=f"only the batch axis squeezes, not dim {dim}"))
        return self[0] if self.has_batch_dim and self.shape[0] == 1 else self

    def unsqueeze(self, dim: int = 0) -> "BlockSparsePattern":
        """Restore the batch axis of a pattern without one (``dim=0`` only)."""
        if dim != 0 or self.has_batch_dim:
            raise ShapeError("unsqueeze(0) restores the batch axis of a pattern without one; nothing else.")
        return self._map_tensors(lambda t: t.unsqueeze(0), batch_axis=True, has_batch_dim=True)

    def _batched(self) -> "BlockSparsePattern":
        return self if self.has_batch_dim else self.unsqueeze(0)

    def __setitem__(self, index, value) -> None:
        raise DensePatternRequiredError(_DENSE_ONLY.format(what="its entries cannot be assigned"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.stack(patterns)`` gives a :class:`~sparse_lens.pattern_stack.BlockSparsePatternStack`;
        any other torch function raises ``DensePatternRequiredError`` naming what to use instead."""
        if func is torch.stack:
            from sparse_lens.pattern_stack import stack_patterns

            return stack_patterns(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        raise DensePatternRequiredError(_not_a_tensor(f"torch.{name}", f"torch.{name}(pattern.block_mass)"))

    def __getattr__(self, name: str) -> Any:
        """Only reached for names the pattern lacks: a ``torch.Tensor`` method or attribute
        (``pattern.mean()``, ``pattern.softmax(-1)``) raises ``DensePatternMethodError``, the method
        form of what ``torch.mean(pattern)`` raises (an ``AttributeError`` too, for ``hasattr``);
        any other name a plain ``AttributeError``."""
        if name in _TENSOR_NAMES:
            raise DensePatternMethodError(_not_a_tensor(f"pattern.{name} (a torch.Tensor attribute)",
                                                        f"pattern.block_mass.{name}"))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getitem__(self, index) -> "BlockSparsePattern":
        """Index the batch axis and/or slice the query axis, as TransformerLens' cache does.

        ``[batch, head, query, key]`` (``[head, query, key]`` without batch dimension). The batch
        selection may be an int (drops the batch axis), a slice or a sequence of ints. The query
        selection is in token positions (an int, a slice, or a sequence of ints, as ``pos_slice``
        gives): the query blocks holding them are kept, which must form one contiguous run
        (``DensePatternRequiredError`` otherwise, e.g. for positions 5 and 900 with 64-token
        blocks). Head and key axes must be ``:`` (``DensePatternRequiredError`` otherwise).
        """
        index = index if isinstance(index, tuple) else (index,)
        if any(sel is Ellipsis for sel in index):
            at = next(i for i, sel in enumerate(index) if sel is Ellipsis)
            index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1:]
        if len(index) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d pattern: {len(index)}")
        index = index + (slice(None),) * (self.ndim - len(index))
        batch_sel = index[0] if self.has_batch_dim else slice(None)
        head_sel, query_sel, key_sel = index[-3:]
        if not _full(head_sel):
            raise DensePatternRequiredError(_DENSE_ONLY.format(what="heads are not indexed one by one"))
        if not _full(key_sel):
            raise DensePatternRequiredError(_DENSE_ONLY.format(what="its key axis is not indexed"))
        pattern = self
        if not _full(query_sel):
            pattern = pattern._select_queries(query_sel)
        if not _full(batch_sel):
            pattern = pattern._select_batch(batch_sel)
        return pattern

    def _select_batch(self, selection: Any) -> "BlockSparsePattern":
        if isinstance(selection, bool) or (isinstance(selection, Tensor) and selection.dim() == 0
                                           and selection.dtype == torch.bool):
            raise IndexError("a single bool does not index a pattern's batch axis; use a row number or a mask.")
        if isinstance(selection, numbers.Integral) or (isinstance(selection, Tensor) and selection.dim() == 0):
            row = int(selection)
            return self._map_tensors(lambda t: t[row], batch_axis=True, has_batch_dim=False)
        if not isinstance(selection, slice):
            selection = _index_tensor(selection, self.block_indices.shape[0], "batch rows").to(self.device)
        return self._map_tensors(lambda t: t[selection], batch_axis=True)

    def _select_queries(self, query_sel: Any) -> "BlockSparsePattern":
        if isinstance(query_sel, slice):
            positions = list(range(self.seq_len)[query_sel])
        else:  # an int, or a list / array / tensor of ints (TransformerLens' Slice gives arrays), or a bool mask
            positions = [p % self.seq_len for p in _index_tensor(query_sel, self.seq_len, "query positions").tolist()]
        if not positions:
            raise IndexError("Empty query selection.")
        first_pos, last_pos = min(positions), max(positions)
        first_row = first_pos // self.query_block - self.first_query_block
        last_row = last_pos // self.query_block - self.first_query_block
        rows_hit = sorted({position // self.query_block for position in positions})
        if len(rows_hit) != last_row - first_row + 1:  # a pattern holds one contiguous run of query blocks
            shown = ", ".join(map(str, rows_hit[:8])) + (", ..." if len(rows_hit) > 8 else "")
            raise DensePatternRequiredError(
                f"the query positions fall in query blocks {shown}: not one contiguous run, and a pattern holds "
                "one contiguous run of query blocks. Select positions whose blocks touch (e.g. a slice "
                "pattern[:, :, a:b]) or index each run separately.")
        if first_row < 0 or last_row >= self.n_query_blocks:
            raise IndexError("Query positions outside the rows this pattern holds.")
        rows = slice(first_row, last_row + 1)
        return replace(
            self,
            block_indices=self.block_indices[..., rows, :],
            block_mass=self.block_mass[..., rows, :],
            block_gate=None if self.block_gate is None else self.block_gate[..., rows, :],
            first_query_block=self.first_query_block + first_row,
        )

    # ----- summaries ------------------------------------------------------------------------
    def recall(self) -> Float[Tensor, "batch head n_query_blocks"]:
        """Attention mass kept per query block: 1 in sparse mode, the dense recall in observe mode."""
        return self.block_mass.sum(-1)

    def kept_pairs(self) -> Int[Tensor, "batch head"]:
        """Query-key pairs the layer can see (causal, and within ``window`` if set) covered by the
        kept blocks, per head (rows held only); [head] without batch dimension."""
        indices = self._batched().block_indices
        full = torch.full(
            (*indices.shape[:2], self.first_query_block, self.top_k), -1, dtype=indices.dtype, device=self.device,
        )
        indices = torch.cat([full, indices], dim=2)
        pairs = kept_pairs_per_slot(indices, self.seq_len, self.query_block, self.key_block)
        if self.window is not None:  # less the pairs the window hides (key <= query - window)
            pairs = pairs - _pairs_per_slot_before(indices, self.seq_len, self.query_block, self.key_block, self.window)
        pairs = pairs.sum(dim=(-1, -2))
        return pairs if self.has_batch_dim else pairs[0]

    def visible_pairs(self) -> int:
        """Query-key pairs one head of this layer can see: causal, T (T + 1) / 2, less those its
        ``window`` hides (each query sees at most ``window`` keys)."""
        hidden = 0 if self.window is None else causal_pairs(max(0, self.seq_len - self.window))
        return causal_pairs(self.seq_len) - hidden

    def pruned_fraction(self) -> float:
        """``1 - kept pairs / visible pairs`` over every batch row and head, where visible pairs
        are those the layer's attention can see (causal, within its window): a windowed layer
        that keeps its whole window band prunes nothing."""
        if self.is_sliced:
            raise ValueError("pruned_fraction needs the whole pattern; this one was sliced along queries.")
        kept = self.kept_pairs()
        return 1.0 - float(kept.sum()) / (self.visible_pairs() * kept.numel())

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

    # ----- FlexAttention vocabulary ---------------------------------------------------------
    @property
    def BLOCK_SIZE(self) -> tuple[int, int]:  # noqa: N802 (FlexAttention's name)
        """``(query_block, key_block)`` in tokens, as ``BlockMask.BLOCK_SIZE``."""
        return (self.query_block, self.key_block)

    @property
    def kv_num_blocks(self) -> Int[Tensor, "batch head n_query_blocks"]:
        """int32 [batch, head, n_query_blocks]: kept key blocks per query block (used slots)."""
        return (self.block_indices >= 0).sum(-1).to(torch.int32)

    @property
    def kv_indices(self) -> Int[Tensor, "batch head n_query_blocks top_k"]:
        """int32 [batch, head, n_query_blocks, top_k]: the compact kept-block list, ascending; only
        the first ``kv_num_blocks`` entries of a row are used (the rest are ``-1``). FlexAttention's
        own ``BlockMask.kv_indices`` is ``[.., Q_BLOCKS, KV_BLOCKS]`` (see :meth:`to_block_mask`)."""
        return self.block_indices.to(torch.int32)

    def to_block_mask(self, max_bytes: int = DEFAULT_BLOCK_MASK_BYTES) -> "BlockMask":
        """A ``torch.nn.attention.flex_attention.BlockMask`` keeping exactly these blocks.

        Kept blocks are partial blocks with a causal ``mask_mod``, so
        ``flex_attention(q, k, v, block_mask=pattern.to_block_mask(), scale=pattern.scale,
        enable_gqa=True)`` reproduces sparse mode's attention (ungated). Its index tables are
        ``[batch, head, Q_BLOCKS, KV_BLOCKS]`` int32 (and the transpose): quadratic in the number
        of blocks.

        Raises:
            ContextTooLongError: those tables would need more than ``max_bytes``.
            ValueError: the pattern was sliced along queries.
        """
        if self.is_sliced:
            raise ValueError("to_block_mask needs the whole pattern; this one was sliced along queries.")
        return block_mask_from_indices(
            self._batched().block_indices, seq_len=self.seq_len, query_block=self.query_block,
            key_block=self.key_block, max_bytes=max_bytes,
        )

    def to_string(self, limit: int = 4, max_blocks: int = 128) -> str:
        """A readable grid per (batch, head), as ``BlockMask.to_string``: one line per query block,
        ``█`` kept key block, ``░`` causal but pruned, blank not causal. At most ``limit`` heads;
        refused (``ContextTooLongError``) beyond ``max_blocks`` blocks per side."""
        n_key_blocks = num_blocks(self.seq_len, self.key_block)
        if max(self.n_query_blocks, n_key_blocks) > max_blocks:
            raise ContextTooLongError(
                f"to_string draws {self.n_query_blocks} x {n_key_blocks} blocks; the limit is max_blocks={max_blocks}."
            )
        if self.is_sliced:
            raise ValueError("to_string needs the whole pattern; this one was sliced along queries.")
        indices = self._batched().block_indices
        parts = [f"{self!r}  (█ kept, ░ pruned, blank not causal)"]
        for flat, (batch, head) in enumerate((b, h) for b in range(indices.shape[0]) for h in range(indices.shape[1])):
            if flat == limit:
                parts.append(f"... {indices.shape[0] * indices.shape[1] - limit} more (batch, head) pairs")
                break
            parts.append(f"batch {batch}, head {head}:" if self.has_batch_dim else f"head {head}:")
            parts += block_grid(indices[batch, head], seq_len=self.seq_len, query_block=self.query_block,
                                key_block=self.key_block)
        return "\n".join(parts)

    # ----- token level ----------------------------------------------------------------------
    def token_probs(self, max_tokens: int = DEFAULT_DENSE_LIMIT) -> Float[Tensor, "batch head seq seq"]:
        """Token-level pattern [batch, head, seq, seq]: ``exp(q.k * scale - lse)`` on kept entries, 0 elsewhere.

        In sparse mode this is the softmax the model actually used (ungated); in observe mode the
        dense probabilities restricted to the kept blocks. Windowed and soft-capped layers: ``s`` is
        the capped score and keys outside the window are 0; with sinks a row sums to at most
        ``1 - sink_probs()`` (the sink's share is dropped). [head, seq, seq] without batch
        dimension. Raises ``ContextTooLongError`` above ``max_tokens`` (the tensor is quadratic
        in the sequence length).
        """
        if self.seq_len > max_tokens:
            raise ContextTooLongError(
                f"token_probs would build a {list(self.shape)} tensor; the limit is max_tokens={max_tokens}. "
                "Use block_mass, or run a window of the sequence, or raise max_tokens if you have the memory."
            )
        if self.query is None or self.key is None:
            raise ValueError("This pattern kept no queries/keys (StreamConfig.keep_qk=False); token_probs needs them.")
        if self.is_sliced:
            raise ValueError("token_probs needs the whole pattern; this one was sliced along queries.")
        batched = self._batched()
        probs = kept_token_probs(
            batched.query, batched.key, batched.block_indices, batched.lse,
            query_block=self.query_block, key_block=self.key_block, scale=self.scale,
            window=self.window, softcap=self.softcap,
        )
        return probs if self.has_batch_dim else probs[0]

    def sink_probs(self) -> Float[Tensor, "batch head seq"]:
        """Probability each query gives its head's sink, ``exp(sink - lse)`` (the dropped share);
        zeros for a layer without sinks. [head, seq] without batch dimension."""
        if self.sinks is None:
            return torch.zeros_like(self.lse)
        sinks = self.sinks.to(device=self.lse.device, dtype=torch.float32)[:, None]
        return torch.exp(sinks - self.lse.float())

    def to_dense(self, max_tokens: int = DEFAULT_DENSE_LIMIT) -> Float[Tensor, "batch head seq seq"]:
        """Deprecated alias of :meth:`token_probs` (removed in the next release)."""
        warnings.warn(
            "BlockSparsePattern.to_dense() is renamed token_probs(); to_dense will be removed in the next release.",
            DeprecationWarning, stacklevel=2,
        )
        return self.token_probs(max_tokens=max_tokens)

    def __repr__(self) -> str:
        *lead, rows, top_k = self.block_indices.shape
        batch = lead[0] if self.has_batch_dim else "removed"
        return (
            f"BlockSparsePattern(mode={self.mode!r}, batch={batch}, heads={lead[-1]}, seq_len={self.seq_len}, "
            f"query_block={self.query_block}, key_block={self.key_block}, top_k={top_k}, rows={rows})"
        )
