"""RMSNorm of the Llama form, torch reference: the test oracle of ``rms_norm_triton``.

HF's RMSNorm of Llama, Qwen2, Mistral, ... (``transformers``' ``LlamaRMSNorm``)::

    h = x.to(float32); variance = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * rsqrt(variance + eps)).to(x.dtype)

is split here in two: :func:`inverse_rms`, the per-row ``rsqrt(variance + eps)`` computed by those
very torch operations (so its reduction order is HF's own on every device), and :func:`rms_norm`,
the elementwise tail that ``rms_norm_triton`` fuses into one pass. Together they are HF's norm bit
for bit: ``rms_norm(x, inverse_rms(x, eps), weight) == LlamaRMSNorm(x)``. Within
:func:`inverse_rms`, :func:`squares` (the upcast and the square) is the reference of
``rms_norm_triton.squares_triton``, which writes them in one pass; :func:`inverse_rms_of_squares`
is the piece logic both share.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

# inverse_rms: the float32 temporaries of one piece hold at most this many elements (256 MiB each)
VARIANCE_PIECE_ELEMENTS = 2**26
# ... and a piece keeps at least this many positions, so that torch sums every row in the order it
# uses on the whole tensor: on CUDA the launch shape of its reductions (threads per row) depends on
# the number of rows while there are few of them (below 16 in PyTorch's Reduce.cuh)
VARIANCE_PIECE_MIN_POSITIONS = 1024


def squares(x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """``x.to(float32).pow(2)``: HF's upcast and square, float32, ``x``'s shape (PyTorch computes
    ``pow(h, 2)`` as ``h * h``, one rounding)."""
    return x.to(torch.float32).pow(2)


def inverse_rms_of_squares(
    x: Float[Tensor, "*batch pos d"],
    eps: float,
    squares_of: Callable[[Tensor], Tensor],
    piece_elements: int = VARIANCE_PIECE_ELEMENTS,
    min_positions: int = VARIANCE_PIECE_MIN_POSITIONS,
) -> Float[Tensor, "*batch pos 1"]:
    """float32 ``rsqrt(squares_of(piece).mean(-1, keepdim=True) + eps)`` over pieces of ``x``'s positions.

    ``squares_of`` maps a piece ``[..., p, d]`` (a view of ``x``, not necessarily contiguous) to its
    float32 squares of the same shape (:func:`squares` or ``rms_norm_triton.squares_triton``). To
    bound memory (a 65,536-position chunk of a d_model = 3584 residual is 0.9 GB per float32
    temporary) the positions are split into equal pieces whose temporaries hold at most
    ``piece_elements`` elements, none shorter than ``min_positions`` positions; each row is reduced
    by the same torch operations, so a row's result does not depend on the split. A 1-D ``x`` (one
    row) is one piece."""
    pieces = 1
    if x.dim() >= 2:
        pieces = max(1, min(-(-x.numel() // max(piece_elements, 1)), x.shape[-2] // max(min_positions, 1)))
    if pieces == 1:
        return torch.rsqrt(squares_of(x).mean(-1, keepdim=True) + eps)
    return torch.cat([torch.rsqrt(squares_of(piece).mean(-1, keepdim=True) + eps)
                      for piece in x.tensor_split(pieces, dim=-2)], dim=-2)


def inverse_rms(
    x: Float[Tensor, "*batch pos d"],
    eps: float,
    piece_elements: int = VARIANCE_PIECE_ELEMENTS,
    min_positions: int = VARIANCE_PIECE_MIN_POSITIONS,
) -> Float[Tensor, "*batch pos 1"]:
    """float32 ``rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)``, HF's operations, bit for bit.

    ``x``: ``[..., pos, d]`` of any float dtype, in pieces of positions as
    :func:`inverse_rms_of_squares` splits it (at most ``piece_elements`` elements per float32
    temporary, at least ``min_positions`` positions per piece), each piece's squares by
    :func:`squares`."""
    return inverse_rms_of_squares(x, eps, squares, piece_elements, min_positions)


def rms_norm(
    x: Float[Tensor, "*batch d"], inverse_rms: Float[Tensor, "*batch 1"], weight: Float[Tensor, " d"]
) -> Float[Tensor, "*batch d"]:
    """``weight * (x.float() * inverse_rms).to(x.dtype)``, as eager PyTorch computes and rounds it:
    the float32 product rounded once to ``x``'s dtype, then its product with ``weight`` (in float32
    for 16-bit dtypes) rounded once. ``inverse_rms``: float32, one value per row (:func:`inverse_rms`);
    ``weight``: ``x``'s dtype."""
    return weight * (x.to(torch.float32) * inverse_rms).to(x.dtype)
