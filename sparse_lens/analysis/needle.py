"""Where does the answer position look? Needle blocks in the kept patterns, per layer and head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from sparse_lens.pattern import BlockSparsePattern


@dataclass(frozen=True)
class NeedleRecall:
    """For the query block holding ``query_position``: per layer and head, whether a key block of
    the needle span is kept, and the attention mass the kept needle blocks receive."""

    kept: Bool[torch.Tensor, "layer head"]
    mass: Float[torch.Tensor, "layer head"]
    needle_blocks: tuple[int, ...]
    query_block: int

    @property
    def kept_fraction(self) -> float:
        return float(self.kept.float().mean())

    def layers_with_needle(self) -> list[int]:
        return [layer for layer in range(self.kept.shape[0]) if bool(self.kept[layer].any())]


def needle_recall(
    patterns: list[BlockSparsePattern], needle_span: tuple[int, int], query_position: int = -1, batch: int = 0
) -> NeedleRecall:
    """Needle recall at ``query_position`` (default: the last token) over a list of per-layer patterns."""
    first = patterns[0]
    position = query_position % first.seq_len
    row = position // first.query_block - first.first_query_block
    needle_blocks = tuple(range(needle_span[0] // first.key_block, (needle_span[1] - 1) // first.key_block + 1))
    kept_rows, mass_rows = [], []
    for pattern in patterns:
        indices = pattern.block_indices[batch, :, row]  # [head, top_k]
        is_needle = torch.isin(indices, torch.tensor(needle_blocks, device=indices.device))
        kept_rows.append(is_needle.any(-1))
        mass_rows.append((pattern.block_mass[batch, :, row] * is_needle).sum(-1))
    return NeedleRecall(torch.stack(kept_rows).cpu(), torch.stack(mass_rows).float().cpu(), needle_blocks, row)
