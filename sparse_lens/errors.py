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
    """The request needs memory quadratic in the sequence length and the sequence is too long.

    Raised by ``BlockSparsePattern.to_dense`` and by ``mode="observe"`` (dense attention),
    never by the sparse path, which is linear in the sequence length.
    """


class UnsupportedModelError(SparseLensError, ValueError):
    """The model family (HF architecture) or one of its attention features is not supported."""


class PaddingNotSupportedError(SparseLensError, ValueError):
    """A batch with padding (a 0 in the attention mask) was passed; sparse_lens runs unpadded sequences."""


class ModelSourceError(SparseLensError, FileNotFoundError):
    """A model name or path could not be resolved to weights (missing file, package, or no hub access)."""
