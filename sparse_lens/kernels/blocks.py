"""Block geometry shared by the estimator, the attention kernels and the pattern.

Conventions used everywhere in sparse_lens:
- query block ``j`` holds token positions ``[j * query_block, min((j + 1) * query_block, T))``;
- key block ``b`` holds positions ``[b * key_block, min((b + 1) * key_block, T))``;
- a query block *sees* key block ``b`` when ``b * key_block`` is at or before its last query,
  so it sees ``ceil(query_end / key_block)`` key blocks;
- ``block_indices`` rows list kept key blocks in ascending order, ``-1`` marks an unused slot
  (always at the end of the row).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_lens.errors import BlockSizeError, InvalidConfigError
from sparse_lens.kernels.checks import is_int_at_least

UNUSED_SLOT = -1


@dataclass(frozen=True)
class BlockGeometry:
    """The block budget every estimator and kernel shares, validated once when it is built.

    A ``BlockGeometry`` that exists is valid: public entry points build (or receive) one and pass
    it inward, and nothing inside checks these numbers again.

    Attributes:
        query_block: Tokens per query block (rows of the block pattern), >= 1.
        key_block: Tokens per key block (columns), >= 1; one of the two block sizes divides the
            other so that the block grids line up.
        top_k: Key blocks kept per query block, sink and local blocks included, >= 1.
        sink_blocks: Always-kept key blocks at the start of the sequence, >= 0.
        local_blocks: Always-kept key blocks ending at each query block's diagonal, >= 0;
            ``sink_blocks + local_blocks <= top_k``.

    Raises:
        BlockSizeError: A block size that is not a positive int, or two that do not divide.
        InvalidConfigError: ``top_k`` < 1, negative sink / local counts, or sink + local > top_k.
    """

    query_block: int
    key_block: int
    top_k: int
    sink_blocks: int = 0
    local_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("query_block", "key_block"):
            size = getattr(self, name)
            if not is_int_at_least(size, 1):
                raise BlockSizeError(f"{name} must be a positive int, got {size!r}.")
        if self.query_block % self.key_block and self.key_block % self.query_block:
            raise BlockSizeError(
                f"query_block={self.query_block} and key_block={self.key_block}: one must divide "
                "the other so that query and key block grids line up (e.g. 64 and 64, or 64 and 16)."
            )
        if not is_int_at_least(self.top_k, 1):
            raise InvalidConfigError(f"top_k counts kept key blocks and must be an int >= 1, got {self.top_k!r}.")
        for name in ("sink_blocks", "local_blocks"):
            count = getattr(self, name)
            if not is_int_at_least(count, 0):
                raise InvalidConfigError(f"{name} must be an int >= 0, got {count!r}.")
        if self.sink_blocks + self.local_blocks > self.top_k:
            raise InvalidConfigError(
                f"sink_blocks + local_blocks = {self.sink_blocks + self.local_blocks} exceeds "
                f"top_k = {self.top_k}: they are counted inside top_k."
            )

    @property
    def n_fixed(self) -> int:
        """Always-kept blocks per row: ``sink_blocks + local_blocks``."""
        return self.sink_blocks + self.local_blocks

    @property
    def n_search(self) -> int:
        """Blocks an estimator chooses per row beside the fixed ones: ``top_k - sink - local``."""
        return self.top_k - self.n_fixed

    def n_query_blocks(self, seq_len: int) -> int:
        """Query blocks covering ``seq_len`` tokens (the last may be partial)."""
        return num_blocks(seq_len, self.query_block)

    def n_key_blocks(self, seq_len: int) -> int:
        """Key blocks covering ``seq_len`` tokens (the last may be partial)."""
        return num_blocks(seq_len, self.key_block)

    def search_rounds(self, seq_len: int, n_search: int | None = None) -> int:
        """Rounds of the hierarchical search: each halves every branch, from ``n_search`` branches
        (default: ``self.n_search``; fewer for the expanded search) over the widest searched range
        (``n_key_blocks - sink - local`` blocks) down to one block,
        ``max(1, ceil(log2(ceil(range / n_search))))``."""
        n_search = self.n_search if n_search is None else n_search
        widest_range = self.n_key_blocks(seq_len) - self.n_fixed
        return max(1, math.ceil(math.log2(max(2, -(-widest_range // max(n_search, 1))))))

    def replace(self, **changes: int) -> "BlockGeometry":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def as_kwargs(self) -> dict[str, int]:
        """The five fields as keyword arguments of a flat-signature kernel."""
        return asdict(self)


def num_blocks(seq_len: int, block: int) -> int:
    """Number of blocks of ``block`` tokens covering ``seq_len`` tokens (the last may be partial)."""
    return -(-seq_len // block)


def blocks_overlapping(span: tuple[int, int], block: int) -> range:
    """Indices of the blocks of ``block`` tokens (block ``b`` holds ``[b * block, (b + 1) * block)``)
    that overlap the token span ``span = (start, end)``, end exclusive:
    ``range(start // block, (end - 1) // block + 1)``. ``ValueError`` for an empty or negative span
    or ``block < 1``."""
    start, end = int(span[0]), int(span[1])
    if block < 1 or not 0 <= start < end:
        raise ValueError(f"blocks_overlapping needs 0 <= start < end and block >= 1, got span={span}, block={block}.")
    return range(start // block, (end - 1) // block + 1)


def visible_key_blocks(
    seq_len: int, query_block: int, key_block: int, device: torch.device | None = None
) -> Int[Tensor, "n_query_blocks"]:
    """For each query block, how many key blocks it sees causally (its diagonal included)."""
    n_query_blocks = num_blocks(seq_len, query_block)
    query_end: Int[Tensor, "n_query_blocks"] = torch.clamp(
        (torch.arange(n_query_blocks, device=device) + 1) * query_block, max=seq_len
    )
    return (query_end + key_block - 1) // key_block


def causal_pairs(seq_len: int) -> int:
    """Query-key pairs of a causal head over ``seq_len`` tokens, T (T + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def kept_pairs_per_slot(
    block_indices: Int[Tensor, "*batch n_query_blocks top_k"],
    seq_len: int,
    query_block: int,
    key_block: int,
) -> Int[Tensor, "*batch n_query_blocks top_k"]:
    """Causal query-key pairs covered by each kept (query block, key block) slot.

    Closed form, no token-level tensor: for queries ``t`` in ``[q_first, q_last]`` and keys
    ``[k_first, k_last]``, query ``t`` sees ``clamp(min(t, k_last) - k_first + 1, 0)`` keys.
    """
    device = block_indices.device
    n_query_blocks = block_indices.shape[-2]
    q_first = torch.arange(n_query_blocks, device=device, dtype=torch.int64) * query_block
    q_last = torch.clamp(q_first + query_block, max=seq_len) - 1
    q_first, q_last = q_first[:, None], q_last[:, None]
    used = block_indices >= 0
    k_first = block_indices.clamp(min=0).to(torch.int64) * key_block
    k_last = torch.clamp(k_first + key_block, max=seq_len) - 1
    # Queries between k_first and k_last see a growing prefix of the block (the diagonal part).
    ramp_first = torch.maximum(q_first, k_first)
    ramp_last = torch.minimum(q_last, k_last)
    ramp_len = (ramp_last - ramp_first + 1).clamp(min=0)
    ramp_pairs = ramp_len * ((ramp_first - k_first + 1) + (ramp_last - k_first + 1)) // 2
    # Queries after k_last see the whole block.
    full_queries = (q_last - torch.maximum(q_first, k_last + 1) + 1).clamp(min=0)
    full_pairs = full_queries * (k_last - k_first + 1)
    return torch.where(used, ramp_pairs + full_pairs, torch.zeros_like(ramp_pairs))


def sort_block_row(block_indices: Int[Tensor, "... top_k"]) -> Int[Tensor, "... top_k"]:
    """Sort each row ascending with the unused slots (-1) moved to the end."""
    big = torch.iinfo(block_indices.dtype).max
    keyed = torch.where(block_indices < 0, torch.full_like(block_indices, big), block_indices)
    keyed = keyed.sort(dim=-1).values
    return torch.where(keyed == big, torch.full_like(keyed, UNUSED_SLOT), keyed)


def pad_to_blocks(tensor: Tensor, block: int, dim: int = -2) -> Tensor:
    """Zero-pad ``dim`` up to a multiple of ``block``."""
    length = tensor.shape[dim]
    missing = num_blocks(length, block) * block - length
    if missing == 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)


def query_blocks_per_chunk(bytes_per_query_block: int, budget_bytes: int = 256 * 2**20) -> int:
    """How many query blocks to process at once so that a chunk's scratch stays near ``budget_bytes``."""
    return max(1, budget_bytes // max(1, bytes_per_query_block))


# Geometry of the estimators' candidate search (search, oneshot, rescore)
def split_into_blocks(tensor: Float[Tensor, "batch head seq d"], block: int) -> Float[Tensor, "batch head n block d"]:
    """Zero-pad the sequence to whole blocks and split it: [batch, head, n_blocks, block, d]."""
    n = num_blocks(tensor.shape[2], block)
    return pad_to_blocks(tensor.float(), block).unflatten(2, (n, block))


def tokens_per_block(seq_len: int, block: int, device: torch.device | None = None) -> Int[Tensor, "n_blocks"]:
    """Real (unpadded) tokens in each block: ``block`` except possibly the last."""
    first = torch.arange(num_blocks(seq_len, block), device=device) * block
    return (seq_len - first).clamp(max=block)


def real_query_mask(block_ids: Int[Tensor, "chunk"], query_block: int, seq_len: int) -> Bool[Tensor, "chunk query_block"]:
    """Which query slots of the given query blocks are real positions (< seq_len)."""
    positions = block_ids[:, None] * query_block + torch.arange(query_block, device=block_ids.device)
    return positions < seq_len


def kv_head_index(n_q_heads: int, n_kv_heads: int, device: torch.device) -> Int[Tensor, "q_head"]:
    """GQA: the key head each query head reads."""
    return torch.arange(n_q_heads, device=device) // (n_q_heads // n_kv_heads)


def gather_per_head(
    table: Float[Tensor, "batch kv_head n ..."], index: Int[Tensor, "batch q_head *rest"]
) -> Tensor:
    """``table[b, h // group, index[b, h, ...]]`` for every query head ``h`` (GQA gather)."""
    batch, n_q_heads = index.shape[:2]
    kv_head = kv_head_index(n_q_heads, table.shape[1], index.device)
    extra = (None,) * (index.dim() - 2)
    batch_idx = torch.arange(batch, device=index.device)[(slice(None), None) + extra]
    return table[batch_idx, kv_head[(None, slice(None)) + extra], index]


def fixed_blocks(
    n_visible: Int[Tensor, "rows"], sink_blocks: int, local_blocks: int
) -> Int[Tensor, "rows n_fixed"]:
    """The always-kept key blocks of each row: ``[0, sink)`` then ``[n_visible - local, n_visible)``."""
    slot = torch.arange(sink_blocks + local_blocks, device=n_visible.device)
    sinks = slot[:sink_blocks].expand(len(n_visible), sink_blocks)
    locals_ = n_visible[:, None] - local_blocks + slot[:local_blocks]
    return torch.cat([sinks, locals_], dim=-1)


def keep_all_rows(n_visible: Int[Tensor, "rows"], width: int) -> Int[Tensor, "rows width"]:
    """Rows that keep every visible key block: ``0 .. n_visible - 1`` then ``-1``."""
    slot = torch.arange(width, device=n_visible.device)
    return torch.where(slot < n_visible[:, None], slot, torch.full_like(slot, UNUSED_SLOT))


def first_searched_block(seq_len: int, query_block: int, key_block: int, top_k: int) -> int:
    """First query block that sees more than ``top_k`` key blocks (a Python int, no tensor: the
    searches compile with ``torch.compile(fullgraph=True)``)."""
    n_query_blocks = num_blocks(seq_len, query_block)
    return next((j for j in range(n_query_blocks)
                 if num_blocks(min((j + 1) * query_block, seq_len), key_block) > top_k), n_query_blocks)


def check_estimator_settings(query_block: int, key_block: int, top_k: int, sink_blocks: int, local_blocks: int) -> None:
    """Validate a flat block budget (``BlockGeometry``'s checks and errors, both ``ValueError``s).

    For flat-signature entry points that do not build a ``BlockGeometry`` themselves (the Triton
    kernels); everything else builds one."""
    BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
