"""Input validation shared by every kernel entry point (reference and Triton alike)."""

from __future__ import annotations

from torch import Tensor

from sparse_lens.errors import InvalidConfigError, ShapeError


def is_int_at_least(value: object, minimum: int) -> bool:
    """True iff ``value`` is a Python ``int`` (not a ``bool``) with ``value >= minimum``.

    The one "whole number" test of the package's validators: ``True`` (an ``int`` subclass) would
    silently count as 1, and ``2.0``, ``numpy.int64(2)`` or a tensor are refused, as they always
    were at every call site. Each caller raises its own named error with its own message.
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_attention_inputs(
    query: Tensor, key: Tensor, value: Tensor | None = None, *, query_offset: int = 0
) -> None:
    """Raise ``ShapeError`` unless q, k (and v) are [batch, heads, seq, d_head] with compatible heads.

    The keys cover ``query_offset`` positions before the first query (0 unless decoding).
    """
    tensors = {"query": query, "key": key} | ({} if value is None else {"value": value})
    for name, tensor in tensors.items():
        if tensor.dim() != 4:
            raise ShapeError(f"{name} must be [batch, heads, seq, d_head], got shape {tuple(tensor.shape)}.")
        if not tensor.is_floating_point():
            raise ShapeError(f"{name} must be a floating-point tensor, got {tensor.dtype}.")
    if (
        query.shape[0] != key.shape[0]
        or query.shape[2] + query_offset != key.shape[2]
        or query.shape[3] != key.shape[3]
    ):
        raise ShapeError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch, seq and d_head"
            + (f" (with {query_offset} cached positions before the queries)." if query_offset else ".")
        )
    if query.shape[1] % key.shape[1]:
        raise ShapeError(
            f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]}) for GQA."
        )
    if value is not None and (value.shape[:3] != key.shape[:3]):
        raise ShapeError(f"value {tuple(value.shape)} must match key {tuple(key.shape)} in batch, heads, seq.")


def check_block_indices(block_indices: Tensor, query: Tensor, n_query_blocks: int) -> None:
    """Raise ``ShapeError`` unless block_indices is an integer [batch, q_head, n_query_blocks, top_k]."""
    expected = (query.shape[0], query.shape[1], n_query_blocks)
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != expected:
        raise ShapeError(
            f"block_indices must be [batch, q_head, n_query_blocks, top_k] = [{expected[0]}, "
            f"{expected[1]}, {expected[2]}, k], got {tuple(block_indices.shape)}."
        )
    if block_indices.is_floating_point():
        raise ShapeError(f"block_indices must be an integer tensor, got {block_indices.dtype}.")


def check_attention_features(window: int | None, softcap: float | None, sinks: Tensor | None, n_q_heads: int) -> None:
    """Validate the optional attention features every kernel entry point takes.

    ``window``: None or an int >= 1 (tokens; query i sees key j iff i - window < j <= i).
    ``softcap``: None or a float > 0 (scores s become softcap * tanh(s / softcap)).
    ``sinks``: None or a floating [q_head] tensor (one sink logit per query head).
    Raises ``InvalidConfigError`` (window, softcap) or ``ShapeError`` (sinks).
    """
    if window is not None and not is_int_at_least(window, 1):
        raise InvalidConfigError(f"window must be None or an int >= 1 (tokens), got {window!r}.")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise InvalidConfigError(f"softcap must be None or a number > 0, got {softcap!r}.")
    if sinks is not None and (
        not isinstance(sinks, Tensor) or sinks.dim() != 1 or sinks.shape[0] != n_q_heads or not sinks.is_floating_point()
    ):
        shape = tuple(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise ShapeError(f"sinks must be a floating [q_head] = [{n_q_heads}] tensor, got {shape}.")
