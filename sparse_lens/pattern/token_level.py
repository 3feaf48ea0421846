"""Token-level values of a :class:`~sparse_lens.pattern.BlockSparsePattern`, recomputed on demand
from the rotated queries and keys it keeps (``StreamConfig.keep_qk``) and the exact softmax
normaliser ``lse``: ``token_probs`` (quadratic in the sequence length, refused above
``max_tokens``) and ``sink_probs``. Mixed into ``BlockSparsePattern``; it uses that dataclass's fields.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_lens.errors import ContextTooLongError, IncompletePatternError, InvalidConfigError
from sparse_lens.kernels.checks import is_int_at_least
from sparse_lens.kernels.sparse_attention import kept_token_probs

DEFAULT_DENSE_LIMIT = 4096


class PatternTokenLevel:
    """``BlockSparsePattern``'s token-level values (see the module docstring)."""

    def token_probs(self, max_tokens: int = DEFAULT_DENSE_LIMIT) -> Float[Tensor, "batch head seq seq"]:
        """Token-level pattern [batch, head, seq, seq]: ``exp(q.k * scale - lse)`` on kept entries, 0 elsewhere.

        In sparse mode this is the softmax the model actually used (ungated); in observe mode the
        dense probabilities restricted to the kept blocks. Windowed and soft-capped layers: ``s`` is
        the capped score and keys outside the window are 0; with sinks a row sums to at most
        ``1 - sink_probs()`` (the sink's share is dropped). [head, seq, seq] without batch
        dimension. Raises ``ContextTooLongError`` above ``max_tokens`` (the tensor is quadratic
        in the sequence length), ``InvalidConfigError`` for a ``max_tokens`` that is not an int >= 1,
        ``IncompletePatternError`` for a pattern sliced along queries or kept without q / k.
        """
        if not is_int_at_least(max_tokens, 1):
            raise InvalidConfigError(f"max_tokens must be an int >= 1 (the longest sequence token_probs builds "
                                     f"a [.., seq, seq] tensor for), got {max_tokens!r}.")
        if self.seq_len > max_tokens:
            raise ContextTooLongError(
                f"token_probs would build a {list(self.shape)} tensor; the limit is max_tokens={max_tokens}. "
                "Use block_mass, or run a window of the sequence, or raise max_tokens if you have the memory."
            )
        if self.query is None or self.key is None:
            raise IncompletePatternError("This pattern kept no queries/keys (StreamConfig.keep_qk=False); token_probs needs them.")
        self.require_whole("token_probs")
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
