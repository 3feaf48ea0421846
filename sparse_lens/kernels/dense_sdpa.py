"""Exact dense causal attention with its log-sum-exp, on PyTorch's fused SDPA kernels.

``dense_attention_sdpa`` has the signature and the result of the chunked torch reference
``dense.dense_attention`` (``(output, lse)``, natural-log ``lse`` of each query's softmax
normaliser, float32) but runs the fused kernel that ``torch.nn.functional.scaled_dot_product_attention``
itself would pick for these tensors (``torch.ops.aten._fused_sdp_choice``): FlashAttention-2 or
cuDNN on CUDA, the flash kernel for CPU elsewhere. It calls that kernel's own entry point, the
one that also returns the log-sum-exp (SDPA's public function drops it), so observe mode costs
what ``mode="dense"`` costs: O(T) memory, no T x T tensor, flash speed.

Per backend (what each ``aten`` entry point returns, as of torch 2.11 - 2.13):

| backend | entry point | ``lse`` it returns |
|---|---|---|
| flash (CUDA) | ``_scaled_dot_product_flash_attention`` | [batch, head, T], float32 |
| flash (CPU) | ``_scaled_dot_product_flash_attention_for_cpu`` | [batch, head, T] |
| cuDNN (CUDA) | ``_scaled_dot_product_cudnn_attention`` | [batch, head, T(, 1)] |
| efficient (CUDA) | ``_scaled_dot_product_efficient_attention`` | [batch, head, >= T] (padded) |

Flash and cuDNN take fewer key heads than query heads (GQA) as they are, as SDPA does; the
efficient kernel gets keys and values repeated per query head. When SDPA would fall back to its
math backend (e.g. float32 on CUDA) there is no fused kernel: ``fused_backend`` returns None and
the dispatcher uses the chunked reference. Only prefill (queries = keys, ``query_offset=0``) runs
here: torch's ``is_causal`` aligns the mask top-left, which is wrong for a KV-cached decode step.

SDPA's fused kernels know no sliding window, logit soft-cap or attention sink. For layers with
any of them, ``dense_attention_band`` is the fast exact path: the block-sparse Triton kernel run
over every block of the causal band (or of the window band, ``window.window_band``), with the
features applied token by token inside it, without block masses (``with_block_mass=False``: a
row's per-slot sums would not fit in registers at thousands of slots). Its cost: the dense work
(or the band's), plus an int32 block table of ``n_query_blocks x band width`` per head (128k
tokens, 64-token blocks, no window: 16 MB per head).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import SDPBackend

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs
from sparse_lens.kernels.window import window_band

BAND_BLOCK = 64  # query and key block of dense_attention_band
FUSED_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def fused_backend(query: Tensor, key: Tensor, value: Tensor, *, scale: float) -> SDPBackend | None:
    """The fused SDPA backend torch picks for causal attention on these tensors, or None (math).

    None also for head sizes that are not a multiple of 8 or values of another width than the
    keys (SDPA pads those itself before calling a fused kernel; the reference handles them here).
    """
    if query.shape[-1] % 8 or value.shape[-1] != query.shape[-1]:
        return None
    try:
        choice = torch.ops.aten._fused_sdp_choice(
            query, key, value, is_causal=True, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
        )
    except RuntimeError:  # "No available kernel": every allowed backend refused (e.g. under sdpa_kernel)
        return None
    backend = SDPBackend(choice)
    return backend if backend in FUSED_BACKENDS else None


def dense_attention_sdpa(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    *,
    scale: float,
    query_offset: int = 0,
) -> tuple[Float[Tensor, "batch q_head seq d_value"], Float[Tensor, "batch q_head seq"]]:
    """Causal softmax attention over all keys: ``(output, lse)``, on torch's fused SDPA kernel.

    Same contract as ``dense.dense_attention`` for ``query_offset=0``. Raises
    ``ShapeError`` when SDPA has no fused kernel for these tensors (``fused_backend`` is None)
    or for ``query_offset != 0``; ``sparse_lens.kernels.dense_attention`` routes such calls to the reference.
    """
    check_attention_inputs(query, key, value, query_offset=query_offset)
    if query_offset:
        raise ShapeError("dense_attention_sdpa runs prefill only (query_offset=0); use the reference.")
    backend = fused_backend(query, key, value, scale=scale)
    seq_len = query.shape[2]
    if backend is None:
        raise ShapeError(f"SDPA has no fused kernel for {query.dtype} on {query.device}; use the reference.")
    if backend == SDPBackend.FLASH_ATTENTION and not query.is_cuda:
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, scale=scale
        )
    elif backend == SDPBackend.FLASH_ATTENTION:
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scale
        )[:2]
    elif backend == SDPBackend.CUDNN_ATTENTION:
        output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale
        )[:2]
    else:  # efficient attention: GQA by repeating keys and values per query head
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        output, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, 0.0, True, scale=scale
        )[:2]
    return output, normalise_lse(lse, query.shape[0], query.shape[1], seq_len)


def normalise_lse(lse: Tensor, batch: int, n_heads: int, seq_len: int) -> Float[Tensor, "batch q_head seq"]:
    """A fused kernel's log-sum-exp as float32 [batch, head, seq]: drops a trailing singleton
    (cuDNN) and the padding past ``seq`` (efficient attention rounds the length up)."""
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    if tuple(lse.shape[:2]) != (batch, n_heads) or lse.shape[2] < seq_len:
        raise ShapeError(f"unexpected log-sum-exp shape {tuple(lse.shape)} for [{batch}, {n_heads}, {seq_len}].")
    return lse[:, :, :seq_len].float().contiguous()


def dense_attention_band(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> tuple[Float[Tensor, "batch q_head seq d_value"], Float[Tensor, "batch q_head seq"]]:
    """Exact causal attention ``(output, lse)`` with a sliding window, soft-cap and/or sinks, on Triton.

    Same contract as ``dense.dense_attention`` (prefill only): the block-sparse Triton kernel
    over the whole band of ``BAND_BLOCK``-token blocks each query block can see. Differentiable.
    """
    from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton

    check_attention_inputs(query, key, value)
    check_attention_features(window, softcap, sinks, query.shape[1])
    band = window_band(query.shape[2], BAND_BLOCK, BAND_BLOCK, window, device=query.device)
    block_indices = band.to(torch.int32).expand(*query.shape[:2], *band.shape)
    output, lse, _ = block_sparse_attention_triton(
        query, key, value, block_indices, query_block=BAND_BLOCK, key_block=BAND_BLOCK, scale=scale,
        window=window, softcap=softcap, sinks=sinks, with_block_mass=False,
    )
    return output, lse
