"""Launch settings of the Stream search kernel (``stream_triton._stream_estimate_kernel``): the
settings it accepts (:func:`check_settings`) and the constexprs and launch options it is compiled
with (:func:`launch_constants`), kept apart from the kernel so that the sm_90 compile test
(``tests/kernels/test_estimator_triton_compile.py``) and the bounds search read the same rules.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton

from sparse_lens.errors import BlockSizeError, InvalidConfigError
from sparse_lens.kernels.stream import expanded_branches

MIN_DOT = 16  # smallest tl.dot dimension
KEY_TILE_BYTES = 65536  # at most one gathered key tile of this size (launch_constants)
PIPELINED_TILE_BYTES = 32768  # up to this key tile the search loop is software-pipelined (launch_constants)
MAX_PIPELINED_CANDIDATES = 128  # ... and up to this CAND_PAD (launch_constants)
MIN_SORTED_CANDIDATES = 128  # from this CAND_PAD on the selection sorts (launch_constants)
MIN_KEY_MAJOR_CANDIDATES = 128  # from this CAND_PAD on the score tile is keys x queries (launch_constants)
Select = Literal["rank", "sort"]


def _is_power_of_two(size: object) -> bool:
    return isinstance(size, int) and size > 0 and size & (size - 1) == 0


def check_settings(query_block, key_block, top_k, sink_blocks, local_blocks, representative_keys) -> None:
    """Refuse settings the kernel cannot run.

    Raises:
        BlockSizeError: a block size that is not a power of two (the torch reference takes any).
        InvalidConfigError: ``top_k < 1``, sink + local blocks beyond ``top_k``, or
            ``representative_keys < 1``.
    """
    for name, size in (("query_block", query_block), ("key_block", key_block)):
        if not _is_power_of_two(size):
            raise BlockSizeError(
                f"{name} must be a power of two for the Triton estimator, got {size!r} "
                "(use sparse_lens.kernels.stream_estimate for other sizes)."
            )
    if not isinstance(top_k, int) or top_k < 1:
        raise InvalidConfigError(f"top_k must be an int >= 1, got {top_k!r}.")
    if sink_blocks < 0 or local_blocks < 0 or sink_blocks + local_blocks > top_k:
        raise InvalidConfigError(
            f"sink_blocks={sink_blocks} and local_blocks={local_blocks} must be >= 0 and sum to at most top_k={top_k}."
        )
    if not isinstance(representative_keys, int) or representative_keys < 1:
        raise InvalidConfigError(f"representative_keys must be an int >= 1, got {representative_keys!r}.")


def launch_constants(*, d_head: int, dtype: torch.dtype, query_block: int, key_block: int, top_k: int,
                     sink_blocks: int, local_blocks: int, representative_keys: int, expand_levels: int,
                     select: Select, interpreting: bool) -> dict:
    """The kernel's constexprs and launch options (``num_warps``, ``num_stages``) for these
    settings: what ``_launch_into`` passes, and what the sm_90 compile test compiles.

    Shared memory (232,448 B per block on the H200) is spent on ``tl.dot``'s operand tiles and
    on layout conversions; the choices that keep it in bounds:

    - ``num_stages``: 3 (Triton's default: the gathered key rows of the next representative key
      load while the current ones are multiplied) when one gathered key tile takes at most
      ``PIPELINED_TILE_BYTES`` and ``CAND_PAD`` is at most ``MAX_PIPELINED_CANDIDATES``; 1
      otherwise, where multi-buffering would overflow (Gemma 3's d_head 256 in fp32 asked
      344,320 B with 3 stages). Compiled for sm_90 on the CPU (Triton 3.9), 3 stages take
      40,960 B for Stream's own search (d_head 128, bf16, ``top_k`` 16) and 115,200 B for the
      rescored estimator's wide one; one stage cost the H200 29% on Stream's search at 128k
      (5.90 against 4.57 ms, ``benchmarks/kernels.py``);
    - ``D_CHUNK``: the head dimension is multiplied in chunks such that one gathered key tile
      (``CAND_PAD x D_CHUNK``) takes at most ``KEY_TILE_BYTES``; one chunk in the common cases;
    - the ``"sort"`` selection from ``CAND_PAD`` ``MIN_SORTED_CANDIDATES`` (128) on, whatever
      ``select`` asks: faster there on the H200 (module doc), and the rank comparison's
      ``CAND_PAD x CAND_PAD`` temporaries would pass through shared memory (1,069,056 B at
      ``CAND_PAD`` 1024, the wide search at 16-token blocks and ``top_k`` 128); same blocks,
      ties aside (module doc);
    - ``KEY_MAJOR`` (a keys x queries score tile) from ``CAND_PAD`` ``MIN_KEY_MAJOR_CANDIDATES``
      (128) on, and 4 warps below ``CAND_PAD`` 256: the fastest of ``benchmarks/search_tiles.py``'s
      sweep at ``CAND_PAD`` 32 and 128 (module doc); ``CAND_PAD`` 64 and 256 follow untimed;
    - ``MASK_KEYS`` false (no causal or padding mask on the scores) when the local blocks span at
      least a query block: every searched key then precedes the block's queries."""
    n_search = expanded_branches(top_k - sink_blocks - local_blocks, expand_levels)
    representative_keys = min(representative_keys, key_block)
    key_stride = key_block // representative_keys
    branch_pad = max(MIN_DOT // 2, triton.next_power_of_2(max(n_search, 1)))
    block_d = max(MIN_DOT, triton.next_power_of_2(d_head))
    element_bytes = 4 if dtype == torch.float32 or interpreting else 2
    d_chunk = max(MIN_DOT, min(block_d, KEY_TILE_BYTES // (2 * branch_pad * element_bytes)))
    sort_select = select == "sort" or 2 * branch_pad >= MIN_SORTED_CANDIDATES
    key_tile_bytes = 2 * branch_pad * d_chunk * element_bytes
    return dict(
        D_HEAD=d_head, BLOCK_D=block_d, D_CHUNK=d_chunk,
        QUERY_BLOCK=query_block, BLOCK_Q=max(MIN_DOT, query_block), KEY_BLOCK=key_block,
        TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k),
        SINK_BLOCKS=sink_blocks, LOCAL_BLOCKS=local_blocks,
        N_SEARCH=n_search, BRANCH_PAD=branch_pad,
        REPRESENTATIVE_KEYS=representative_keys, KEY_STRIDE=key_stride,
        KEY_FIRST=(key_block - 1 - (representative_keys - 1) * key_stride) // 2,
        DOT_PRECISION="ieee" if dtype == torch.float32 or interpreting else "tf32",
        UPCAST_TILES=interpreting, EXPAND_LEVELS=expand_levels,
        SORT_SELECT=sort_select,
        MASK_KEYS=local_blocks * key_block < query_block,  # powers of two: the local blocks cover the queries
        KEY_MAJOR=2 * branch_pad >= MIN_KEY_MAJOR_CANDIDATES,
        num_warps=8 if branch_pad >= 128 else 4,
        num_stages=3 if key_tile_bytes <= PIPELINED_TILE_BYTES and 2 * branch_pad <= MAX_PIPELINED_CANDIDATES else 1,
    )
