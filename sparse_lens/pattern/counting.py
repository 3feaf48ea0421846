"""Counting what a :class:`~sparse_lens.pattern.BlockSparsePattern` keeps: attention mass kept per
query block (``recall``), query-key pairs covered by the kept blocks (``kept_pairs``), pairs the
layer can see at all (``visible_pairs``: causal, within its window) and ``pruned_fraction``.
Closed-form pair counts, O(batch x head x n_query_blocks x top_k). Mixed into ``BlockSparsePattern``;
it uses that dataclass's fields.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import causal_pairs, kept_pairs_per_slot


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



class PatternCounting:
    """``BlockSparsePattern``'s summaries: recall, kept / visible pairs, pruned fraction."""

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
        self.require_whole("pruned_fraction")
        kept = self.kept_pairs()
        return 1.0 - float(kept.sum()) / (self.visible_pairs() * kept.numel())
