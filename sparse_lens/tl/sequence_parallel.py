"""Heads across ranks for one long sequence: Ulysses-style sequence parallelism (arXiv 2309.14509).

Outside attention every rank holds a shard of the sequence (``T / P`` positions, ``P`` ranks) for
every layer's residual stream, MLP and unembedding. Around each attention layer an all-to-all
swaps the split: after RoPE, rank ``r`` receives the whole sequence for its share of the KV
heads (``n_kv_heads / P`` heads, ``r``-th group) and the query heads that read them; the
estimator, the kernels and the hooks ``hook_block_indices`` / ``hook_block_mass`` /
``hook_pattern`` run unchanged on those heads (a rank's ``BlockSparsePattern`` has its heads
only, numbered from 0); a second all-to-all gives every rank its shard of every head back
before the output projection. The degree ``P`` is limited by the number of KV heads: it must
divide it (:class:`~sparse_lens.errors.SequenceParallelError`).

Neither DeepSpeed's ``DistributedAttention`` (DeepSpeed is not a dependency, and it wraps a
local attention callable the bridge does not expose) nor accelerate's ``ParallelismConfig(sp_size=...)``
(DeepSpeed's ALST backend only, for training) fit; this module is the thin all-to-all wrapper
and nothing more. Launch one process per GPU with ``torchrun`` (NCCL) or spawn them (gloo on
the CPU)::

    torch.distributed.init_process_group("nccl")
    model = sl.HookedSparseTransformer.from_pretrained(name, device=f"cuda:{local_rank}")
    local_tokens, position_ids = shard_sequence(tokens)
    with sequence_parallel(model):
        local_logits = model(local_tokens, position_ids=position_ids)   # [batch, T / P, d_vocab]
    logits = gather_sequence(local_logits)                              # [batch, T, d_vocab], every rank

Prefill only: decoding with a KV cache (``generate``) is not sequence parallel.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import SequenceParallelError


def check_degree(n_kv_heads: int, world_size: int) -> None:
    """Raise :class:`SequenceParallelError` unless ``world_size`` ranks can split ``n_kv_heads``."""
    if world_size < 1 or n_kv_heads % world_size:
        raise SequenceParallelError(
            f"Heads across {world_size} ranks needs the number of KV heads ({n_kv_heads}) to be a multiple "
            f"of the number of ranks: each rank takes whole KV heads with their query heads. Use a degree "
            f"that divides {n_kv_heads}."
        )


def shard_sequence(
    tokens: Int[Tensor, "batch pos"], group: dist.ProcessGroup | None = None
) -> tuple[Int[Tensor, "batch local_pos"], Int[Tensor, "batch local_pos"]]:
    """This rank's contiguous shard of ``tokens`` and its global ``position_ids`` (for RoPE)."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_len = tokens.shape[-1]
    if seq_len % world_size:
        raise SequenceParallelError(
            f"The sequence ({seq_len} tokens) must split into {world_size} equal shards, one per rank."
        )
    shard = seq_len // world_size
    start = rank * shard
    positions = torch.arange(start, start + shard, device=tokens.device).expand(tokens.shape[0], shard)
    return tokens[:, start:start + shard], positions


def gather_sequence(
    local: Float[Tensor, "batch local_pos *rest"], group: dist.ProcessGroup | None = None
) -> Float[Tensor, "batch pos *rest"]:
    """The whole sequence on every rank from each rank's shard (dim 1), in rank order."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0 (chunk ``p`` goes to rank ``p``); its backward is the same
    exchange of the gradients (chunk ``p`` came from rank ``p`` and goes back to it)."""

    @staticmethod
    def forward(ctx: Any, chunks: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        chunks = chunks.contiguous()  # before empty_like, which would copy a permuted layout
        received = torch.empty_like(chunks)
        dist.all_to_all_single(received, chunks, group=group)
        return received

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        sent_back = torch.empty_like(grad)
        dist.all_to_all_single(sent_back, grad, group=ctx.group)
        return sent_back, None


def sequence_to_heads(
    local: Float[Tensor, "batch head local_pos d"], group: dist.ProcessGroup | None = None
) -> Float[Tensor, "batch local_head pos d"]:
    """All-to-all: every head of this rank's positions -> this rank's heads at every position."""
    world_size = dist.get_world_size(group)
    check_degree(local.shape[1], world_size)
    chunks = rearrange(local, "b (rank h) t d -> rank b h t d", rank=world_size)
    received = _AllToAll.apply(chunks, group)  # [source rank = sequence shard, b, h, t, d]
    return rearrange(received, "rank b h t d -> b h (rank t) d")


def heads_to_sequence(
    gathered: Float[Tensor, "batch local_head pos d"], group: dist.ProcessGroup | None = None
) -> Float[Tensor, "batch head local_pos d"]:
    """The inverse all-to-all: this rank's heads at every position -> every head of its positions."""
    world_size = dist.get_world_size(group)
    chunks = rearrange(gathered, "b h (rank t) d -> rank b h t d", rank=world_size)
    received = _AllToAll.apply(chunks, group)  # [source rank = head group, b, h, t, d]
    return rearrange(received, "rank b h t d -> b (rank h) t d")


@contextlib.contextmanager
def sequence_parallel(model: Any, group: dist.ProcessGroup | None = None) -> Iterator[Any]:
    """While open, every sparse attention layer of ``model`` runs heads across the ranks of
    ``group`` (default: the world); feed each rank its :func:`shard_sequence`.

    Raises:
        SequenceParallelError: the group's size does not divide the model's KV heads.
    """
    if not dist.is_initialized():
        raise SequenceParallelError("sequence_parallel needs torch.distributed.init_process_group() first.")
    check_degree(int(model.cfg.n_key_value_heads or model.cfg.n_heads), dist.get_world_size(group))
    layers = model.sparse_attention_layers()
    for attention in layers:
        attention._prefill = _heads_across_ranks(attention._prefill, group)  # this instance only
    try:
        yield model
    finally:
        for attention in layers:
            del attention._prefill  # back to the class's method


def _heads_across_ranks(prefill: Any, group: dist.ProcessGroup | None) -> Any:
    """``prefill`` (the bridge's per-head attention on the whole sequence) between two all-to-alls."""

    def prefill_on_my_heads(query: Tensor, key: Tensor, value: Tensor, scale: float, **features: Any) -> Tensor:
        # ``features``: the layer's attention features (e.g. a sliding window, a logit soft-cap), the
        # same for every head, so they pass through unchanged; per-head ones would need slicing.
        if features.get("sinks") is not None:
            raise SequenceParallelError("Learned attention sinks are per head; heads across ranks does not slice them yet.")
        query, key, value = (sequence_to_heads(x, group) for x in (query, key, value))
        return heads_to_sequence(prefill(query, key, value, scale, **features), group)

    return prefill_on_my_heads
