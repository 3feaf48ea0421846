"""Launch Triton kernels on their tensors' device, not on the current CUDA device.

A Triton launch goes to ``torch.cuda.current_device()``. When a model's layers sit on several
GPUs (``device_map``), a layer on ``cuda:1`` would otherwise launch its kernels on ``cuda:0``
with pointers into ``cuda:1`` memory: ``CUDA error: an illegal memory access``. Every launch in
``*_triton.py`` is wrapped by :func:`launch_on_tensor_device`. On the CPU (``TRITON_INTERPRET=1``)
and for any non-CUDA tensor both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

Launch = TypeVar("Launch", bound=Callable[..., Any])


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
