"""Sliding-window geometry: which key blocks a windowed layer's query blocks can see.

A sliding-window layer (Mistral, Gemma 2/3 local layers, gpt-oss) lets query ``i`` see key ``j``
iff ``i - window < j <= i`` (HF's convention: the query itself and the ``window - 1`` keys
before it). Keys older than the window are never candidates, so a query block's candidate key
blocks are the ones its queries' windows overlap: a band along the diagonal, at most
``max_window_blocks(window, query_block, key_block)`` blocks wide whatever the sequence length.

Policy (used by the model side): a windowed layer whose widest band fits in the budget
(``window_fits``) keeps exactly its band (``window_band``), with no estimation: its sparse
attention is then exact. The token-level window mask inside the band's boundary blocks is applied
by the attention kernels (``window=``), like the causal mask inside the diagonal block.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Int
from torch import Tensor

from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels.blocks import UNUSED_SLOT, num_blocks
from sparse_lens.kernels.checks import check_attention_features


def check_window(window: int | None) -> None:
    """Raise ``InvalidConfigError`` unless ``window`` is None or an int >= 1 (tokens)."""
    check_attention_features(window, None, None, 0)


def window_blocks(query_block_id: int, *, seq_len: int, query_block: int, key_block: int,
                  window: int | None) -> range:
    """Key blocks that query block ``query_block_id``'s queries can see: its causal band cut to the window.

    Queries ``[q0, q1]`` of the block see keys ``[max(0, q0 - window + 1), q1]`` (all keys up to
    ``q1`` when ``window`` is None); the key blocks overlapping those keys, ascending.
    """
    check_window(window)
    first_query = query_block_id * query_block
    if not 0 <= first_query < seq_len:
        raise InvalidConfigError(f"query block {query_block_id} is outside a sequence of {seq_len} tokens.")
    last_query = min(first_query + query_block, seq_len) - 1
    first_key = 0 if window is None else max(0, first_query - window + 1)
    return range(first_key // key_block, last_query // key_block + 1)


def window_band(
    seq_len: int, query_block: int, key_block: int, window: int | None, *, device: torch.device | None = None
) -> Int[Tensor, "n_query_blocks width"]:
    """The key blocks each query block's window overlaps: int64 [n_query_blocks, width].

    Rows ascending, ``-1`` padded at the end (the first rows see fewer blocks); ``width`` is the
    widest row. With ``window=None`` every causally visible block (the dense band). Broadcast it
    to ``[batch, head, n_query_blocks, width]`` for ``block_indices``: sparse attention over it
    equals windowed dense attention exactly.
    """
    check_window(window)
    n_query_blocks = num_blocks(seq_len, query_block)
    first_query = torch.arange(n_query_blocks, device=device) * query_block
    last_query = torch.clamp(first_query + query_block, max=seq_len) - 1
    first_key = first_query if window is None else first_query - window + 1
    first_block = torch.zeros_like(first_query) if window is None else first_key.clamp(min=0) // key_block
    last_block = last_query // key_block
    width = int((last_block - first_block).max()) + 1 if n_query_blocks else 0
    band = first_block[:, None] + torch.arange(width, device=device)
    return torch.where(band <= last_block[:, None], band, UNUSED_SLOT)


def max_window_blocks(window: int, query_block: int, key_block: int) -> int:
    """The widest band of a windowed layer, over every query block of any sequence (in key blocks)."""
    check_window(window)
    widest = 0
    # Past the start (where the window is clamped at 0), the band of query block j depends on j
    # only through j * query_block modulo key_block: one period of lcm(query_block, key_block).
    period = query_block * key_block // math.gcd(query_block, key_block)
    start = period * -(-window // period)  # a first query far enough from 0, aligned like position 0
    for j in range(period // query_block):
        first_query = start + j * query_block
        last_query = first_query + query_block - 1
        widest = max(widest, last_query // key_block - (first_query - window + 1) // key_block + 1)
    return widest


def window_fits(window: int | None, key_block: int, top_k: int, *, query_block: int | None = None) -> bool:
    """Whether a layer of this window can keep its whole band within ``top_k`` key blocks.

    ``query_block`` defaults to ``key_block``. ``window=None`` (a global layer) never fits: its
    band grows with the sequence.
    """
    if window is None:
        return False
    return max_window_blocks(window, query_block or key_block, key_block) <= top_k
