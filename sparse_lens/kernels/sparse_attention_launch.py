"""Launch settings and host-side launch plan of the block-sparse attention kernels (no kernel here).

``KernelLaunch``: how a kernel is launched (warps, pipeline stages, branching or branch-free key-tile
loop, which tiles are masked, tile sizes, the split dk / dv backward, the grid order, L2 hints);
every setting leaves the results unchanged up to fp32 rounding. ``FORWARD_LAUNCH`` /
``BACKWARD_LAUNCH``: the defaults, the fastest of the first H200 sweep (figures in
``sparse_attention_triton``); from ``LONG_BACKWARD_FROM`` tokens on (head dims up to 128, rows of
up to ``WIDE_ROWS`` slots) the backward runs ``LONG_BACKWARD_LAUNCH`` (``backward_launch``). The
plan of one launch: ``query_grid`` (one program per query block and query head),
``launch_for_rows`` (branch on rows wider than ``WIDE_ROWS`` slots), ``fit_shared_memory`` (fewer
stages / smaller tiles where the tiles' ``shared_memory_bytes`` exceed ``SHARED_MEMORY_BUDGET``,
e.g. d_head 256: the backward, and float32's forward), ``launch_for_sizes`` (both, as the launches
use them), ``launch_config`` (the kernels' compile-time constants), ``kernel_sizes`` and ``feature_args``
(their runtime integer and feature arguments). ``check_triton_block_sizes`` and the tile limits
``MAX_TILE`` / ``MIN_BLOCK``, the ``SUPPORTED_DTYPES``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor

from sparse_lens.errors import BlockSizeError, InvalidConfigError
from sparse_lens.kernels.checks import is_int_at_least

MAX_TILE = 64  # rows of a query tile and keys of a key tile, at most
MIN_BLOCK = 16  # smallest tile tl.dot accepts
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_triton_block_sizes(query_block: int, key_block: int) -> None:
    """Raise ``BlockSizeError`` unless both block sizes are powers of two of at least 16."""
    for name, block in (("query_block", query_block), ("key_block", key_block)):
        if not isinstance(block, int) or block < MIN_BLOCK or block & (block - 1):
            raise BlockSizeError(
                f"The Triton block-sparse attention needs {name} to be a power of two >= {MIN_BLOCK} "
                f"(tl.dot tiles), got {block!r}; use the torch reference block_sparse_attention for other sizes."
            )


@dataclass(frozen=True)
class KernelLaunch:
    """How a kernel is launched; every setting leaves the results unchanged (up to fp32 rounding).

    ``num_warps``, ``num_stages``: Triton's (``num_stages``: depth of the software pipeline of the
    key-tile loop's loads). ``skip_unreached``: branch around key tiles that are wholly invisible
    (an unused slot, a block after the query tile, one older than the window), which saves their
    work but keeps Triton from pipelining the loop's loads; without it the loop is branch-free and
    such tiles are read at block 0 and masked. ``mask_all``: apply the causal / window mask to
    every tile; off, only to tiles that need it (a branch per tile; the others are whole).
    ``query_tile`` / ``key_tile``: rows of a query tile and keys of a key tile, at most (capped by
    the block sizes; powers of two >= 16).
    ``kv_chunk`` (backward only): 0 adds each tile's dk / dv to global memory with atomics inside
    the one backward kernel; ``n > 0`` makes dk / dv in a second kernel, one program per key tile
    and chunk of at most ``n`` (query head, query block) slots that keep its block, summed in
    registers (one atomic add per chunk). ``dq_atomics`` (with ``kv_chunk``): that kernel also makes
    dq and d gate from the same tile products, adding each slot's share with fp32 atomics, and the
    first kernel only ``delta`` (FlashAttention-2's backward: no tile product made twice, 5 per
    (slot, query tile) instead of ``kv_chunk``'s 7, k and v read once per chunk; the price: dq
    atomics, an fp32 buffer of one GQA group's dq, 4 x group x seq x d_head bytes (none where dq is
    fp32), and dq / d gate whose last bits vary from run to run). ``heads_inner``: the grid runs the
    query heads of a GQA group side by side on each query block (so that programs running together
    read one key head's blocks: its local and shared picks hit L2); else query blocks vary fastest,
    within one head.
    ``l2_hints``: tiles read by many programs (k, v; q, dO in the key/value kernel) are loaded with
    ``eviction_policy="evict_last"``, those read once with ``"evict_first"``, to keep the former in L2.
    Raises ``InvalidConfigError`` for a ``kv_chunk`` that is not an int >= 0, or ``dq_atomics``
    without ``kv_chunk`` (it would be ignored).
    """

    num_warps: int = 4
    num_stages: int = 3
    skip_unreached: bool = True
    mask_all: bool = True
    query_tile: int = MAX_TILE
    key_tile: int = MAX_TILE
    kv_chunk: int = 0
    heads_inner: bool = False
    l2_hints: bool = False
    dq_atomics: bool = False

    def __post_init__(self) -> None:
        if not is_int_at_least(self.kv_chunk, 0):
            raise InvalidConfigError(f"kv_chunk must be an int >= 0 (slots per chunk, 0: off), got {self.kv_chunk!r}.")
        if self.dq_atomics and self.kv_chunk == 0:
            raise InvalidConfigError("dq_atomics needs kv_chunk > 0: dq and d gate are added by the key/value "
                                     "kernel, which runs only with kv_chunk.")

    def kernel_options(self) -> dict:
        """``num_warps`` / ``num_stages`` keyword arguments of a Triton launch."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


# The defaults, the fastest of the first H200 sweep at 64x64 blocks (benchmarks/results/h200x2_2026-11-30c/
# attention_sweep.json; the previous default was KernelLaunch(): 4 warps, branching, every tile masked).
FORWARD_LAUNCH = KernelLaunch(skip_unreached=False, mask_all=False)
BACKWARD_LAUNCH = KernelLaunch(num_warps=8, skip_unreached=False, mask_all=False, heads_inner=True)
# FlashAttention-2's order (dk / dv by key block, dq by atomics) from 256k tokens on: H200, bf16, 64x64 blocks,
# Stream's top-16, effective TFLOP/s of BACKWARD_LAUNCH / this (benchmarks/results/h200_2026-12-01s10/c2/):
# Qwen2.5-1.5B heads 149 / 137 at 128k, 135 / 149 at 256k, 122 / 153 at 512k, 115 / 155 at 1M; Llama-3.1-8B
# heads 152 / 147 at 128k, 121 / 153 at 512k, 114 / 153 at 1M (chunks of 64 slots: within 1-3% of 128).
# Likely (not profiled): BACKWARD_LAUNCH's fp32 dk / dv atomics (64 KB per kept tile) miss L2 more as T grows.
LONG_BACKWARD_LAUNCH = KernelLaunch(num_warps=8, skip_unreached=False, mask_all=False, kv_chunk=128, dq_atomics=True)
LONG_BACKWARD_FROM = 262_144  # tokens
LONG_BACKWARD_MAX_HEAD_DIM = 128  # measured there only; at 256 its key/value kernel can exceed shared memory
WIDE_ROWS = 64  # slots per row above which the kernels always branch around unreached tiles


def query_grid(n_query_blocks: int, batch: int, n_q_heads: int, n_kv_heads: int, heads_inner: bool) -> tuple:
    """The grid of the per-query-block kernels: one program per (query block, batch, query head);
    ``heads_inner`` (``KernelLaunch.heads_inner``, the rescoring's ``HEADS_INNER``): a GQA group's
    query heads side by side on each query block (``sparse_attention_tiles.block_and_head``)."""
    if heads_inner:
        return (n_query_blocks * (n_q_heads // n_kv_heads), batch * n_kv_heads)
    return (n_query_blocks, batch * n_q_heads)


def backward_launch(seq_len: int, head_dim: int, top_k: int) -> KernelLaunch:
    """The backward's default launch for ``seq_len`` tokens, the larger of the query / value head
    dims and ``top_k`` slots per row: ``LONG_BACKWARD_LAUNCH`` from ``LONG_BACKWARD_FROM`` tokens on,
    up to ``LONG_BACKWARD_MAX_HEAD_DIM`` and ``WIDE_ROWS`` slots (measured ahead at 256k and beyond,
    behind at 128k, at top_k 16; lengths between are unmeasured; a dense band's thousands of slots
    per row would make its slot table, about 90 bytes a slot while it is built, tens of gigabytes),
    else ``BACKWARD_LAUNCH``."""
    if seq_len >= LONG_BACKWARD_FROM and head_dim <= LONG_BACKWARD_MAX_HEAD_DIM and top_k <= WIDE_ROWS:
        return LONG_BACKWARD_LAUNCH
    return BACKWARD_LAUNCH


def launch_for_rows(launch: KernelLaunch, top_k: int) -> KernelLaunch:
    """``launch``, but branching around unreached tiles on rows of more than ``WIDE_ROWS`` slots:
    a dense band's rows (``dense_sdpa.dense_attention_band``) are mostly unused slots in its early
    query blocks, where the branch-free loop would read and mask them all."""
    return replace(launch, skip_unreached=True) if top_k > WIDE_ROWS else launch


# Shared memory one program may take on sm_90 (H100 / H200: 227 KiB, the opt-in per-block limit);
# a launch whose tiles would need more fails to load there (Triton's OutOfResources).
SHARED_MEMORY_BUDGET = 232_448


def shared_memory_bytes(launch: KernelLaunch, query_block: int, key_block: int, block_d: int, block_dv: int,
                        element_size: int, *, backward: bool) -> int:
    """Bytes of shared memory a launch of the forward (or, ``backward``, the backward) kernel takes
    on sm_90: an upper bound, within 1 KiB of what Triton compiles where that is near the budget.

    The tiles Triton stages there, in the inputs' ``element_size`` bytes: the key and value tiles
    in the pipeline's buffers, and the query tile (with dO in the backward). 16-bit inputs run on
    tensor cores (wgmma), which read their operands from the pipeline's buffers: ``num_stages``
    buffers; the backward also keeps a second copy of the query and dO tiles and 16 KiB of
    scratch. float32 products (``ieee``, no tensor cores) load from ``num_stages - 1`` buffers (one
    at ``num_stages`` 1) and keep [query tile, key tile] scratch (one in the forward, two in the
    backward, at least 16 KiB). Plus 1 KiB. Measured (Triton 3.6 and 3.9, sm_90, 64-token blocks,
    d_head 256, the JIT's specialisation of aligned tensors): bf16 forward 229,376 B at 3 stages;
    bf16 backward (8 warps) 327,680 at 3 stages, 262,144 at 2, 212,992 with 32-key tiles; fp32
    forward 344,320 / 213,248 / 139,520, backward 425,984 / 294,912 / 212,992.
    """
    query_tile, key_tile = min(query_block, launch.query_tile), min(key_block, launch.key_tile)
    key_value_tile = key_tile * (block_d + block_dv)
    if element_size < 4:  # tensor cores
        if backward:
            return element_size * (2 * query_tile * (block_d + block_dv) + launch.num_stages * key_value_tile) + 17 * 1024
        return element_size * (query_tile * block_d + launch.num_stages * key_value_tile) + 1024
    buffers = max(1, launch.num_stages - 1)
    if backward:
        scratch = max(16 * 1024, element_size * 2 * query_tile * key_tile)
        return element_size * (query_tile * (block_d + block_dv) + buffers * key_value_tile) + scratch + 1024
    return element_size * (query_tile * block_d + buffers * key_value_tile + query_tile * key_tile) + 1024


def fit_shared_memory(launch: KernelLaunch, query_block: int, key_block: int, block_d: int, block_dv: int,
                      element_size: int, *, backward: bool, budget: int = SHARED_MEMORY_BUDGET) -> KernelLaunch:
    """``launch``, made small enough that ``shared_memory_bytes`` fits ``budget`` bytes (unchanged if
    it does): fewer pipeline stages (down to 2), then halved key tiles, then halved query tiles (down
    to ``MIN_BLOCK``), then one stage. E.g. d_head 256 at 64-token blocks: the float32 forward runs
    2 stages; the backward, in bf16 / fp16 as in float32, 2 stages and 32-key tiles; the bf16
    forward and every d_head-128 launch stay as they are. Results are unchanged (fp32 rounding)."""
    def fits(candidate: KernelLaunch) -> bool:
        return shared_memory_bytes(candidate, query_block, key_block, block_d, block_dv, element_size,
                                   backward=backward) <= budget

    while not fits(launch):
        query_tile, key_tile = min(query_block, launch.query_tile), min(key_block, launch.key_tile)
        if launch.num_stages > 2:
            launch = replace(launch, num_stages=launch.num_stages - 1)
        elif key_tile > MIN_BLOCK:
            launch = replace(launch, key_tile=key_tile // 2)
        elif query_tile > MIN_BLOCK:
            launch = replace(launch, query_tile=query_tile // 2)
        elif launch.num_stages > 1:
            launch = replace(launch, num_stages=1)
        else:
            break  # the smallest launch; Triton reports it if even that does not fit
    return launch


def launch_for_sizes(launch: KernelLaunch, query: Tensor, value: Tensor, block_indices: Tensor, query_block: int,
                     key_block: int, *, backward: bool) -> KernelLaunch:
    """The launch a kernel runs: ``launch_for_rows`` then ``fit_shared_memory`` for the inputs' head
    dims and dtype (``backward``: for the backward kernels)."""
    launch = launch_for_rows(launch, block_indices.shape[-1])
    block_d = max(MIN_BLOCK, triton.next_power_of_2(query.shape[-1]))
    block_dv = max(MIN_BLOCK, triton.next_power_of_2(value.shape[-1]))
    return fit_shared_memory(launch, query_block, key_block, block_d, block_dv, query.element_size(),
                             backward=backward)


def launch_config(query: Tensor, value: Tensor, block_indices: Tensor, block_gate: Tensor | None,
                   query_block: int, key_block: int, window: int | None = None, softcap: float | None = None,
                   sinks: Tensor | None = None, *, scale: float = 1.0, launch: KernelLaunch = FORWARD_LAUNCH) -> dict:
    """Compile-time constants of both kernels."""
    query_tile, key_tile = min(query_block, launch.query_tile), min(key_block, launch.key_tile)
    block_d = max(MIN_BLOCK, triton.next_power_of_2(query.shape[-1]))
    block_dv = max(MIN_BLOCK, triton.next_power_of_2(value.shape[-1]))
    seq_len = query.shape[2]
    return dict(
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None,
        QUERY_BLOCK=query_block, KEY_BLOCK=key_block, QUERY_TILE=query_tile, KEY_TILE=key_tile,
        BLOCK_D=block_d, BLOCK_DV=block_dv,
        SLOTS=max(2, triton.next_power_of_2(block_indices.shape[-1])),
        HAS_GATE=block_gate is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        # The Triton interpreter multiplies bf16 tl.dot operands as raw uint16 bits
        # (triton-lang/triton#11584): there, bf16 operands are multiplied in fp32 instead.
        DOT_UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        # Tiles wholly in range (no row or column masks on the loads):
        EVEN=seq_len % query_tile == 0 and seq_len % key_tile == 0
        and block_d == query.shape[-1] and block_dv == value.shape[-1],
        FOLD_SCALE=scale > 0,  # the scale rides in the exp2's multiply-add (the row max needs scale > 0)
        SKIP_UNREACHED=launch.skip_unreached, MASK_ALL=launch.mask_all, HEADS_INNER=launch.heads_inner,
        KV_EVICTION="evict_last" if launch.l2_hints else "", ONCE_EVICTION="evict_first" if launch.l2_hints else "",
    )


def kernel_sizes(query: Tensor, key: Tensor, value: Tensor, block_indices: Tensor) -> tuple:
    """Runtime integer arguments shared by both kernels, after the pointers and ``scale``."""
    batch, n_q_heads, seq_len, d_head = query.shape
    n_query_blocks, top_k = block_indices.shape[2:]
    return seq_len, n_q_heads, key.shape[1], n_query_blocks, top_k, d_head, value.shape[-1]


def feature_args(window: int | None, softcap: float | None) -> tuple[int, float]:
    """Runtime ``window, softcap`` kernel arguments (unread placeholders when the feature is off)."""
    return (0 if window is None else int(window)), (1.0 if softcap is None else float(softcap))
