"""Block-sparse attention, Triton kernels (forward and backward) matching ``sparse_attention``.

``block_sparse_attention_triton`` has the signature and semantics of the torch reference
``block_sparse_attention``: each query attends causally to the keys of its query block's kept key
blocks only, softmax renormalised over those keys; it returns ``(output, lse, block_mass)`` and is
differentiable (through ``output``) with respect to query, key, value and ``block_gate``.

The pieces (each module's docstring has the details):

- ``sparse_attention_fwd_triton``: the forward kernel (one program per (head, query block), the
  flash-attention online softmax in base 2 over the block's kept key tiles, ``block_mass`` in the
  same pass) and ``launch_forward``;
- ``sparse_attention_bwd_triton``: the backward kernel (dq, d gate, d sink; dk, dv by atomics)
  and, with ``KernelLaunch.kv_chunk``, the key/value gradient kernel (dk, dv by key tile; with
  ``dq_atomics`` also dq and d gate, FlashAttention-2's order, the default from 256k tokens), and
  ``launch_backward``;
- ``sparse_attention_tiles``: the device helpers both share (tile loads and stores,
  products, base-2 scores and the soft-cap, the causal / window mask, the per-tile plan);
- ``sparse_attention_launch``: ``KernelLaunch``, the default launches ``FORWARD_LAUNCH`` /
  ``BACKWARD_LAUNCH`` / ``LONG_BACKWARD_LAUNCH`` (``backward_launch`` picks by length), the grid
  and the kernels' compile-time constants;
- here: ``block_sparse_attention_triton`` (checks its inputs once, runs the autograd Function that
  calls the two launches) and the names other modules, tests and benchmarks import from this module.

Optional features (``window``, ``softcap``, ``sinks``; semantics in ``sparse_attention``)
    Each is a constexpr flag (``HAS_WINDOW``, ``HAS_SOFTCAP``, ``HAS_SINKS``), so the default call
    compiles to the same code as without them. ``scores_log2`` caps the scores
    (``softcap * tanh(s / softcap)``, tanh written with ``exp``) and ``visibility`` adds the window to
    the causal mask; tiles wholly older than the window are unreached. A sink starts each row's
    online softmax as one already-seen element (running max = sink, running sum = 1, no value),
    so ``lse``, the output and ``block_mass`` include it. Backward: ``ds`` is multiplied by the
    cap's derivative ``1 - (capped / softcap)^2``; ``d sink = -sum over queries of exp(sink - lse) *
    delta``, one fp32 atomic add per (head, query block) into a [q_head] buffer.

Memory traffic per (head, query block): the query tile once, each kept key/value tile once
(``top_k * key_block * (d + d_value)`` elements), the output and lse once; the backward adds the
output and its gradient once and the dk/dv atomics (or, split, the key/value kernel's reads of
q, dO, lse and delta per slot). Nothing of size T x T or ``top_k * key_block`` per query is ever
written to global memory; registers hold at most a query tile x key tile of scores. Query blocks
vary fastest in the grid by default, so programs running together belong to one head and share
its sink and local key blocks in L2 (``KernelLaunch.heads_inner``: the query heads of a GQA group
vary fastest, sharing their key head's blocks). Total work is O(T * top_k * key_block * d) per head.

Measured on one H200 (triton 3.6, bf16, Qwen2.5-1.5B heads: 12 query / 2 KV, d = 128, 64-token
blocks, Stream's top 16; ``benchmarks/attention_sweep.py``, TFLOP/s on the kept causal pairs):
forward 2.03 ms at T = 128k, 392 TFLOP/s (the branching launch before: 2.61 ms, 305), 21.4 ms at
1M, 299 (25.8 ms, 248); backward 13.6 ms at 128k, 147 TFLOP/s (15.5 ms, 128), 139 ms at 1M, 115
(156 ms, 103); dense cuDNN SDPA at 128k: 92.6 ms forward, 240 ms backward. At 1M the forward reads
key/value tiles at 4.9 TB/s, HBM's rate: random picks miss L2, and 64x64 tiles give 64 FLOPs per
byte, so it is bandwidth-bound there.

Inputs are made contiguous; fp32, bf16 and fp16 are supported, accumulation is fp32; fp32
products use ``input_precision="ieee"`` (no TF32), bf16/fp16 products run on tensor cores. Under
the Triton interpreter (``TRITON_INTERPRET=1``, the CPU test runs) bf16 products are made in fp32,
because the interpreter's ``tl.dot`` mishandles bf16. Block sizes must be powers of two >= 16
(``tl.dot`` tiles need at least 16 rows and columns). Where the sequence is a whole number of
tiles and the head dims are powers of two (``EVEN``) the tile loads carry no masks.
``launch_forward`` / ``launch_backward`` write into caller-given buffers, with a ``KernelLaunch``:
the tests use them to run the kernels into poisoned outputs, benchmarks/attention_sweep.py to time
the launch variants.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import ShapeError
from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.checks import check_attention_features, check_attention_inputs, check_block_indices
from sparse_lens.kernels.sparse_attention_bwd_triton import backward_kernel, key_value_grad_kernel, launch_backward
from sparse_lens.kernels.sparse_attention_fwd_triton import forward_kernel, launch_forward
from sparse_lens.kernels.sparse_attention_launch import (
    BACKWARD_LAUNCH,
    FORWARD_LAUNCH,
    MAX_TILE,
    MIN_BLOCK,
    SUPPORTED_DTYPES,
    WIDE_ROWS,
    KernelLaunch,
    check_triton_block_sizes,
    launch_config,
    launch_for_rows,
    query_grid,
)
from sparse_lens.kernels.sparse_attention_tiles import kv_row, load_rows, masked_scores, soft_cap

__all__ = [
    "BACKWARD_LAUNCH",
    "FORWARD_LAUNCH",
    "MAX_TILE",
    "MIN_BLOCK",
    "SUPPORTED_DTYPES",
    "WIDE_ROWS",
    "KernelLaunch",
    "backward_kernel",
    "block_sparse_attention_triton",
    "check_triton_block_sizes",
    "forward_kernel",
    "key_value_grad_kernel",
    "kv_row",
    "launch_backward",
    "launch_config",
    "launch_for_rows",
    "launch_forward",
    "load_rows",
    "masked_scores",
    "query_grid",
    "soft_cap",
]

# The autograd function runs the kernels through these names (tests/tl/test_checkpointing.py replaces them).
_launch_forward, _launch_backward = launch_forward, launch_backward
# tests/kernels/test_sparse_attention_triton_compile.py compiles the kernels through these names.
_forward_kernel, _backward_kernel, _key_value_grad_kernel = forward_kernel, backward_kernel, key_value_grad_kernel
_launch_config = launch_config


class _BlockSparseAttention(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward; lse and block_mass are not differentiable."""

    @staticmethod
    def forward(ctx, query, key, value, block_gate, sinks, block_indices, query_block, key_block, scale, window,
                softcap, with_mass):
        batch, n_q_heads, seq_len, _ = query.shape
        output: Float[Tensor, "batch q_head seq d_value"] = query.new_empty(
            (batch, n_q_heads, seq_len, value.shape[-1])
        )
        lse: Float[Tensor, "batch q_head seq"] = query.new_empty((batch, n_q_heads, seq_len), dtype=torch.float32)
        block_mass: Float[Tensor, "batch q_head n_query_blocks top_k"] = query.new_empty(
            block_indices.shape if with_mass else (0,), dtype=torch.float32
        )
        _launch_forward(query, key, value, block_indices, block_gate, output, lse, block_mass,
                        query_block=query_block, key_block=key_block, scale=scale, window=window,
                        softcap=softcap, sinks=sinks, with_mass=with_mass)
        ctx.save_for_backward(query, key, value, block_gate, sinks, block_indices, output, lse)
        ctx.blocks = (query_block, key_block, scale, window, softcap)
        ctx.mark_non_differentiable(lse, block_mass)
        return output, lse, block_mass

    @staticmethod
    def backward(ctx, grad_output, _grad_lse, _grad_block_mass):
        query, key, value, block_gate, sinks, block_indices, output, lse = ctx.saved_tensors
        query_block, key_block, scale, window, softcap = ctx.blocks
        grad_query: Float[Tensor, "batch q_head seq d_head"] = torch.empty_like(query)
        grad_key: Float[Tensor, "batch kv_head seq d_head"] = torch.zeros_like(key, dtype=torch.float32)
        grad_value: Float[Tensor, "batch kv_head seq d_value"] = torch.zeros_like(value, dtype=torch.float32)
        grad_gate = None if block_gate is None else torch.empty_like(block_gate)
        grad_sinks = None if sinks is None else torch.zeros_like(sinks, dtype=torch.float32)
        _launch_backward(query, key, value, block_indices, block_gate, output, grad_output.contiguous(), lse,
                         grad_query, grad_key, grad_value, grad_gate,
                         query_block=query_block, key_block=key_block, scale=scale, window=window,
                         softcap=softcap, sinks=sinks, grad_sinks=grad_sinks)
        return (grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), grad_gate, grad_sinks,
                None, None, None, None, None, None, None)


def block_sparse_attention_triton(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    value: Float[Tensor, "batch kv_head seq d_value"],
    block_indices: Int[Tensor, "batch q_head n_query_blocks top_k"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    block_gate: Float[Tensor, "batch q_head n_query_blocks top_k"] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
    with_block_mass: bool = True,
) -> tuple[
    Float[Tensor, "batch q_head seq d_value"],
    Float[Tensor, "batch q_head seq"],
    Float[Tensor, "batch q_head n_query_blocks top_k"] | None,
]:
    """Attention restricted to the kept key blocks: ``(output, lse, block_mass)``, on Triton.

    ``with_block_mass=False`` returns ``block_mass=None`` and skips its per-slot sums: for rows of
    very many slots (``dense_sdpa.dense_attention_band``), where they would spill registers.

    Same contract as ``sparse_attention.block_sparse_attention`` (with ``window``,
    ``softcap`` and ``sinks``); differentiable w.r.t. query, key, value, ``block_gate`` and
    ``sinks`` (the sink gradient is returned in float32, cast to the sinks' dtype) through
    ``output``. Block sizes: powers of two >= 16.
    """
    check_attention_inputs(query, key, value)
    check_attention_features(window, softcap, sinks, query.shape[1])
    check_triton_block_sizes(query_block, key_block)
    check_block_indices(block_indices, query, num_blocks(query.shape[2], query_block))
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in SUPPORTED_DTYPES:
        raise ShapeError(
            f"query, key and value must share one dtype of {SUPPORTED_DTYPES}, "
            f"got {query.dtype}, {key.dtype}, {value.dtype}."
        )
    if block_gate is not None and block_gate.shape != block_indices.shape:
        raise ShapeError(f"block_gate {tuple(block_gate.shape)} must match block_indices {tuple(block_indices.shape)}.")
    if block_gate is not None:
        block_gate = block_gate.contiguous()
    if sinks is not None:
        sinks = sinks.to(device=query.device, dtype=torch.float32).contiguous()
    output, lse, block_mass = _BlockSparseAttention.apply(
        query.contiguous(), key.contiguous(), value.contiguous(), block_gate, sinks,
        block_indices.to(torch.int32).contiguous(), query_block, key_block, scale, window, softcap, with_block_mass,
    )
    return (output, lse, block_mass) if with_block_mass else (output, lse, None)
