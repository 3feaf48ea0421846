"""Named errors raised by sparse_lens.

Every user-facing failure has its own class so that callers can catch exactly
what they expect, and so that messages can say what to do instead.
"""


class SparseLensError(Exception):
    """Base class of every error sparse_lens raises on purpose."""


class InvalidConfigError(SparseLensError, ValueError):
    """A StreamConfig field is out of range (top_k < 1, unknown mode, ...)."""


class BlockSizeError(InvalidConfigError):
    """Block sizes that are not positive, or a query and key block of which neither divides the other."""


class ShapeError(SparseLensError, ValueError):
    """A tensor handed to a kernel or a pattern has the wrong shape or dtype."""


class ContextTooLongError(SparseLensError, MemoryError):
    """The request needs more memory than the device has for this sequence length.

    Raised before any work starts, by what is quadratic in the sequence length
    (``BlockSparsePattern.token_probs``, ``mode="observe"``'s dense attention) and by what holds
    ``[batch, pos, d_vocab]`` logits at every position (``sl.fidelity`` and ``collect_dense``
    without ``positions=``), never by the sparse forward, which is linear in the sequence length.
    """


class UnsupportedModelError(SparseLensError, ValueError):
    """The model family (HF architecture) or one of its attention features is not supported."""


class PaddingNotSupportedError(SparseLensError, ValueError):
    """A batch with padding (a 0 in the attention mask) was passed; sparse_lens runs unpadded sequences."""


class ModelSourceError(SparseLensError, FileNotFoundError):
    """A model name or path could not be resolved to weights (missing file, package, or no hub access)."""


class IncompletePatternError(SparseLensError, ValueError):
    """A pattern lacks what the method needs: it was sliced along queries (``pattern[:, :, a:b]``;
    ``to_block_mask``, ``to_string``, ``pruned_fraction`` and ``token_probs`` need the whole
    pattern), or it kept no queries and keys (``keep_qk=False``; ``token_probs`` needs them)."""


class InvalidPatternError(SparseLensError, ValueError):
    """An edited pattern (returned by a ``hook_pattern`` / ``hook_block_indices`` / ``hook_block_mass``
    hook) is not one attention can run on: a block out of range, a block listed twice, a block
    after the query block's causal horizon, a query left with no visible key, or a changed geometry."""


class DensePatternRequiredError(SparseLensError, TypeError):
    """An operation needs a dense ``[batch, head, query, key]`` pattern tensor (indexing heads or keys,
    writing entries: what ``transformer_lens.patching``'s ``..._attn_head_pattern_...`` helpers do),
    which sparse_lens never builds. The message names the block-level tool to use instead."""


class DensePatternMethodError(DensePatternRequiredError, AttributeError):
    """A dense tensor's method or attribute read on a ``BlockSparsePattern`` (``pattern.mean()``,
    ``pattern.softmax(-1)``, ``pattern.dtype``), which has none: the method form of the
    ``DensePatternRequiredError`` that ``torch.mean(pattern)`` raises. Also an ``AttributeError``,
    so ``hasattr(pattern, "mean")`` stays False and ``getattr(pattern, "dtype", None)`` None."""


class PatternGeometryError(ShapeError):
    """Patterns of different geometry (sequence length, block sizes, top_k, batch, heads, rows)
    were combined, e.g. by ``torch.stack`` / ``ActivationCache.stack_activation``."""


class ObserveModeEditError(SparseLensError, RuntimeError):
    """A hook edited the pattern, its block indices or its block mass in ``mode="observe"``, where
    the model runs dense attention and nothing sparse can be recomputed; use ``mode="sparse"``."""


class LogitsNotKeptError(SparseLensError, IndexError):
    """A metric read logits at a position the tool did not keep: with ``positions=`` the metric
    receives ``[batch, len(positions), d_vocab]`` logits, the kept positions in order."""


class GradientModeError(SparseLensError, ValueError):
    """Gradients were asked for in a mode that cannot give them: ``mode="observe"`` (its chunked
    dense attention would keep quadratic memory for the backward) or gate gradients outside
    ``mode="sparse"`` (gates exist only on the sparse attention)."""


class InvalidPathError(SparseLensError, ValueError):
    """A path-patching request the model cannot carry out: an unknown layer or head, a
    ``receiver_input`` other than ``"q"``, ``"k"``, ``"v"``, a key/value receiver named by a query
    head under GQA, or a sender at or after a receiver's layer (its output cannot reach it)."""


class InvalidSpanError(SparseLensError, ValueError):
    """A token span ``[start, end)`` that is empty or reaches outside the sequence, or no spans at all."""


class InvalidPositionsError(SparseLensError, ValueError):
    """Positions whose logits a tool should keep (``positions=``) that are empty, repeated or
    outside the sequence."""


class SequenceParallelError(SparseLensError, ValueError):
    """Heads across ranks (``sparse_lens.tl.sequence_parallel``) cannot split this model or input:
    the number of ranks must divide the number of KV heads (each rank takes whole KV heads and
    their query heads), and the sequence length must divide evenly into one shard per rank."""


class TraceMismatchError(SparseLensError, ValueError):
    """A saved trace (e.g. ``fidelity``'s ``dense=``, a ``DenseTrace``) was made from other tokens
    than the ones it is used with, or with another model: collect it again on these tokens, with
    this model."""
