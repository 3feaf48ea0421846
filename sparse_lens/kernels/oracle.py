"""The exact top-k oracle: per (head, query block), the ``top_k`` key blocks of largest dense mass.

It is what fidelity compares an estimator with: perfect block selection at the same budget.
The dense mass of a block needs the exact normaliser ``lse`` of each query (from dense
attention, e.g. an observe-mode pattern) and ``q . k`` over every visible key: the work of
``q k^T``, half of dense attention. The ``[n_query_blocks, n_key_blocks]`` mass matrix is never
held whole: it is computed a chunk of query blocks at a time (``block_mass_rows``: Triton on
CUDA, the torch reference elsewhere) and reduced to its top-k at once, so memory is the chunk
(``chunk_bytes``) plus the [.., n_query_blocks, top_k] result.

Windowed / soft-capped layers: ``window`` and ``softcap`` go to the block masses, and key blocks
older than a query block's window (``window.window_band``) are never candidates; ``sinks`` only
enter through ``lse`` (a row's oracle recall is then at most ``1 - mean sink probability``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import UNUSED_SLOT, num_blocks, visible_key_blocks
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs
from sparse_lens.kernels.dispatch import Backend, block_mass_rows


def oracle_blocks(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    lse: Float[Tensor, "batch q_head seq"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    scale: float,
    rows: Int[Tensor, "n_rows"] | None = None,
    backend: Backend = "auto",
    chunk_bytes: int = 2**30,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> tuple[Int[Tensor, "batch q_head n_rows top_k"], Float[Tensor, "batch q_head n_rows top_k"]]:
    """The exact top-k key blocks by dense block mass: ``(block_indices, block_mass)``.

    ``block_indices`` follow the pattern contract (ascending, ``-1`` = unused slot when a query
    block sees fewer than ``top_k`` key blocks); ``block_mass`` is each kept block's dense mass
    averaged over the query block (0 in unused slots), so ``block_mass.sum(-1)`` is the oracle's
    recall. ``rows`` (ascending query block ids, default all) restricts the work to those query
    blocks, e.g. a sample of them at a million tokens. Ties between equal masses are broken by
    ``torch.topk``. ``chunk_bytes`` bounds the float32 mass rows held at once. ``window`` /
    ``softcap`` / ``sinks``: the layer's, see the module docstring.
    """
    check_attention_inputs(query, key)
    check_attention_features(window, softcap, sinks, query.shape[1])
    if not isinstance(top_k, int) or top_k < 1:
        raise InvalidConfigError(f"top_k must be an int >= 1, got {top_k!r}.")
    batch, n_q_heads, seq_len, _ = query.shape
    n_query_blocks = num_blocks(seq_len, query_block)
    rows = torch.arange(n_query_blocks, device=query.device) if rows is None else rows.to(query.device).long()
    n_visible = visible_key_blocks(seq_len, query_block, key_block, device=query.device)[rows]
    # First key block each row's window reaches (0 without a window): older blocks are never kept.
    first_visible = torch.zeros_like(n_visible) if window is None else (
        (rows * query_block - window + 1).clamp(min=0) // key_block
    )
    row_bytes = batch * n_q_heads * num_blocks(seq_len, key_block) * 4
    chunk = max(1, chunk_bytes // row_bytes)
    if rows.numel() == 0:
        empty = torch.zeros((batch, n_q_heads, 0, top_k), device=query.device)
        return empty.long(), empty
    indices, masses = [], []
    for first in range(0, rows.numel(), chunk):
        ids = rows[first : first + chunk]
        mass = block_mass_rows(query, key, lse, ids, query_block=query_block, key_block=key_block,
                               scale=scale, backend=backend, window=window, softcap=softcap)
        if window is not None:  # blocks older than the window must lose to every candidate, even at mass 0
            too_old = torch.arange(mass.shape[-1], device=mass.device) < first_visible[first : first + chunk, None]
            mass = mass.masked_fill(too_old, -1.0)
        best = mass.topk(min(top_k, mass.shape[-1]), dim=-1)
        visible = (best.indices < n_visible[first : first + chunk, None]) & (
            best.indices >= first_visible[first : first + chunk, None]
        )
        missing = top_k - best.indices.shape[-1]  # > 0 when the chunk's rows see fewer than top_k blocks
        indices.append(F.pad(torch.where(visible, best.indices, UNUSED_SLOT), (0, missing), value=UNUSED_SLOT))
        masses.append(F.pad(torch.where(visible, best.values, 0.0), (0, missing), value=0.0))
    block_indices = torch.cat(indices, dim=2)
    block_mass = torch.cat(masses, dim=2)
    # Ascending block ids, unused slots last: sort by id with -1 counted as past every block.
    order = torch.where(block_indices < 0, torch.iinfo(torch.int64).max, block_indices).argsort(dim=-1)
    return block_indices.gather(-1, order), block_mass.gather(-1, order)
