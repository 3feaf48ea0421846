"""Launch Triton kernels on their tensors' device, not on the current CUDA device.

A Triton launch goes to ``torch.cuda.current_device()``. When a model's layers sit on several
GPUs (``device_map``), a layer on ``cuda:1`` would otherwise launch its kernels on ``cuda:0``
with pointers into ``cuda:1`` memory: ``CUDA error: an illegal memory access``. Every launch in
``*_triton.py`` is wrapped by :func:`launch_on_tensor_device`. On the CPU (``TRITON_INTERPRET=1``)
and for any non-CUDA tensor both helpers do nothing.

:func:`run_beside` starts independent work on a side CUDA stream of a tensor's device (observe
mode's dense attention runs beside the estimate); elsewhere it defers the work to its join.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

Launch = TypeVar("Launch", bound=Callable[..., Any])
Result = TypeVar("Result")


def cuda_device_of(tensor: Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor, a no-op context otherwise."""
    device = tensor.device
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch_on_tensor_device(launch: Launch) -> Launch:
    """Decorator: run ``launch`` under :func:`cuda_device_of` its first tensor argument.

    Every tensor of one launch shares a device (the kernels' callers check it), so the first one
    names the device for all of them. A call without tensor arguments runs unchanged.
    """

    @functools.wraps(launch)
    def on_device(*args: Any, **kwargs: Any) -> Any:
        tensor = next((value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)), None)
        with cuda_device_of(tensor) if tensor is not None else contextlib.nullcontext():
            return launch(*args, **kwargs)

    return on_device  # type: ignore[return-value]


def run_beside(work: Callable[[], Result], like: Tensor) -> Callable[[], Result]:
    """Start ``work()`` now on a side stream of ``like``'s CUDA device; returns ``join``, which
    makes the current stream wait for it and returns its result (a tensor or a tuple of tensors).

    The side stream first waits for the current one (``work`` reads what it has queued), and the
    result's tensors are recorded on the current stream, so the caching allocator does not hand
    their memory to the side stream's next allocation while the current stream still reads them.
    ``work``'s inputs stay referenced by the caller until ``join`` returns. For a tensor not on
    CUDA, ``work`` runs inside ``join`` (the order of a plain call).
    """
    if like.device.type != "cuda":
        return work
    with torch.cuda.device(like.device):
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = work()

    def join() -> Result:
        with torch.cuda.device(like.device):
            current.wait_stream(side)
        for tensor in result if isinstance(result, tuple) else (result,):
            if isinstance(tensor, Tensor):
                tensor.record_stream(current)
        return result

    return join
