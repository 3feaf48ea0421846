"""Exact dense block masses at several block sizes from one pass (the oracle's masses, for measuring).

``dense_block_masses`` gives, for every square block size asked for, the dense softmax mass of
every (query block, key block) pair averaged over the query block's real queries: what
``dense.dense_block_mass`` gives for one size. It makes one pass at the smallest size
(``dispatch.block_mass_rows``: Triton on CUDA, the torch reference elsewhere), turns the masses
back into sums over the queries and pools them to each larger size, so several block sizes cost
one pass. Memory: the ``[batch, q_head, T / smallest, T / smallest]`` float32 mass matrix, so it
is for the benchmarks' moderate lengths; at length ``oracle.oracle_blocks`` streams rows instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparse_lens.errors import BlockSizeError
from sparse_lens.kernels.blocks import num_blocks, pad_to_blocks, tokens_per_block
from sparse_lens.kernels.checks import check_attention_inputs, is_int_at_least
from sparse_lens.kernels.dispatch import Backend, block_mass_rows


def dense_block_masses(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    lse: Float[Tensor, "batch q_head seq"],
    blocks: Sequence[int],
    *,
    scale: float,
    backend: Backend = "auto",
) -> dict[int, Float[Tensor, "batch q_head n_blocks n_blocks"]]:
    """``{block: mass}`` with ``mass[.., j, c]`` the dense softmax mass of query block ``j`` on key
    block ``c`` (query and key blocks of ``block`` tokens), averaged over ``j``'s real queries;
    0 where ``j`` does not see ``c``.

    Args:
        query, key: Rotated queries and keys (GQA: ``kv_head`` divides ``q_head``).
        lse: Each query's exact log-sum-exp of ``scale * q . k`` over its causal keys (from dense
            attention).
        blocks: Block sizes in tokens, each a multiple of the smallest.
        scale: Softmax scale of the logits.
        backend: Where the pass at the smallest size runs (``dispatch.block_mass_rows``).

    Raises:
        ShapeError: Malformed q / k.
        BlockSizeError: No size, a size < 1, or one that is not a multiple of the smallest.
    """
    check_attention_inputs(query, key)
    if not blocks or not all(is_int_at_least(b, 1) for b in blocks):
        raise BlockSizeError(f"blocks must be positive ints, got {list(blocks)!r}.")
    base = min(blocks)
    if any(block % base for block in blocks):
        raise BlockSizeError(f"every block size must be a multiple of the smallest ({base}), got {list(blocks)}.")
    seq_len = query.shape[2]
    n_base = num_blocks(seq_len, base)
    mass = block_mass_rows(query, key, lse, torch.arange(n_base, device=query.device), query_block=base,
                           key_block=base, scale=scale, backend=backend)
    # per-row sums over the queries (the rows are means over each query block's real queries)
    total = F.pad(mass, (0, n_base - mass.shape[-1])) * tokens_per_block(seq_len, base, mass.device)[:, None].float()
    masses = {}
    for block in blocks:
        factor = block // base
        pooled = pad_to_blocks(pad_to_blocks(total, factor, -1), factor, -2)
        pooled = pooled.unflatten(-1, (-1, factor)).sum(-1).unflatten(-2, (-1, factor)).sum(-2)
        masses[block] = pooled / tokens_per_block(seq_len, block, mass.device)[:, None].float()
    return masses
