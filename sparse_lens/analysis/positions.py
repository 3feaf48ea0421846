"""Logits at chosen positions only: the ``positions=`` argument of the circuit tools.

A metric usually reads one or a few positions, while the full logits are ``[batch, T, d_vocab]``
(40 GB at 128k tokens for a 152k vocabulary). The tools pass ``positions`` to the model as HF's
``logits_to_keep`` (an index tensor), and the metric then receives
``logits[:, positions]``: shape ``[batch, len(positions), d_vocab]``, in the order given.
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from sparse_lens.errors import InvalidPathError, InvalidPositionsError, LogitsNotKeptError, ShapeError


def kept_positions(
    positions: Sequence[int] | Tensor | None, seq_len: int, device: torch.device | str | None = None,
    *, ascending: bool = False,
) -> Int[Tensor, "n_positions"] | None:
    """``positions`` as a 1-D int64 tensor of positions in ``[0, seq_len)`` (negative values count
    from the end, as in Python: ``-1`` is ``seq_len - 1``), or ``None`` when ``positions`` is
    ``None`` (keep every position). The one check of every tool's ``positions=``.

    ``ascending=True`` (``sl.fidelity``, whose ``final_*`` figures are those of the last position)
    also requires them in increasing order once counted from the start (``[10, -1]`` is).

    Raises:
        InvalidPositionsError: empty, not 1-D integers, repeated, outside the sequence
            (``< -seq_len`` or ``>= seq_len``), or, with ``ascending``, out of order.
    """
    if positions is None:
        return None
    index = torch.as_tensor(positions)
    if index.ndim != 1 or index.numel() == 0 or index.is_floating_point() or index.dtype == torch.bool:
        raise InvalidPositionsError(f"positions must be a non-empty 1-D list of ints, got {positions!r}.")
    index = index.to(torch.int64)
    if bool(((index < -seq_len) | (index >= seq_len)).any()):
        raise InvalidPositionsError(f"positions {index.tolist()} reach outside the {seq_len} tokens.")
    index = index % seq_len
    if index.unique().numel() != index.numel():
        raise InvalidPositionsError(f"positions {index.tolist()} repeat a position.")
    if ascending and bool((index.diff() < 0).any()):
        raise InvalidPositionsError(f"positions must be ascending (counted from the start of the {seq_len} "
                                    f"tokens), got {index.tolist()[:8]}.")
    return index.to(device) if device is not None else index


def logits_kwargs(index: Tensor | None) -> dict:
    """Keyword arguments for a model call that keeps the logits at ``index`` only (none: all).

    The index goes on the CPU: HF's head indexes the final hidden states with it, and with layers
    spread over several GPUs those live on the last layer's GPU, not on ``cfg.device``; a CPU index
    serves any device."""
    return {} if index is None else {"logits_to_keep": index.cpu()}


def call_metric(metric: Callable[[Tensor], Tensor], logits: Tensor, index: Tensor | None) -> Tensor:
    """``metric(logits)`` as a scalar tensor; a read past the kept positions raises ``LogitsNotKeptError``."""
    try:
        value = metric(logits)
    except IndexError as error:
        if index is None:
            raise
        raise LogitsNotKeptError(
            f"The metric indexed logits outside the {index.numel()} kept positions {index.tolist()[:8]} "
            f"(logits shape {tuple(logits.shape)}: index i of dim 1 is the i-th kept position). Pass the "
            f"positions the metric reads in positions=. ({error})"
        ) from error
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ShapeError(f"metric must return a scalar tensor, got {type(value).__name__} "
                         f"{tuple(value.shape) if isinstance(value, Tensor) else ''}.")
    return value.reshape(())


def check_indices(chosen: Iterable[int] | None, count: int, what: str) -> list[int]:
    """``chosen`` (default: all of ``range(count)``) as a list of ints in ``[0, count)``; else ``InvalidPathError``."""
    if chosen is None:
        return list(range(count))
    chosen = list(chosen)
    try:
        checked = [operator.index(value) for value in chosen]
    except TypeError:
        checked = []
    if len(checked) != len(chosen) or any(not 0 <= value < count for value in checked):
        raise InvalidPathError(f"{what} {chosen} must be ints in 0..{count - 1} (the model has {count} {what}).")
    return checked
