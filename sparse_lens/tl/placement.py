"""Layers across devices (the capacity path): accelerate's ``device_map`` / ``max_memory`` and
TransformerLens 4.3's ``n_devices``, for models too big for one GPU.

The conventions are TransformerLens' (``boot_transformers(device_map=..., n_devices=...,
max_memory=...)``, resolved by ``transformer_lens.utilities.multi_gpu.resolve_device_map``):
``device_map`` is a HF / accelerate map (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict
from module names to devices), ``n_devices=N`` means ``"balanced"`` over the first ``N`` CUDA
devices, and ``device`` excludes both. Loaded models go through HF's ``from_pretrained(device_map=...)``;
random-init models (``from_config``) are built on the CPU and placed by accelerate's
``infer_auto_device_map`` and ``dispatch_model``, whose hooks move each layer's input to that
layer's device. Nothing else changes: the estimator and the kernels run on their tensors'
device (Triton launches under ``torch.cuda.device``, ``kernels.device_guard``), and
``run_with_cache`` keeps each layer's ``BlockSparsePattern`` on that layer's device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from sparse_lens.errors import InvalidConfigError

DeviceMap = str | dict[str, str | int | torch.device]


def resolve_placement(
    device: str | torch.device | None,
    device_map: DeviceMap | None,
    n_devices: int | None,
    max_memory: dict[str | int, str | int] | None,
) -> tuple[DeviceMap | None, dict | None]:
    """``(device_map, max_memory)`` for HF / accelerate, or ``(None, ...)`` for one device.

    Raises:
        InvalidConfigError: ``device`` together with ``device_map`` or ``n_devices > 1``, a ``device``
            torch does not know or this machine does not have (:func:`check_device`), more
            devices than CUDA has, or a map target that holds no data (``"meta"``, ``"disk"``).
    """
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    if device is not None and (device_map is not None or (n_devices or 1) > 1):
        raise InvalidConfigError("Pass device for one device, or device_map / n_devices for several; not both.")
    if device is not None:
        check_device(device)
    try:
        resolved, memory = resolve_device_map(n_devices, device_map, None, max_memory)
    except ValueError as error:
        raise InvalidConfigError(str(error)) from error
    if isinstance(resolved, dict):
        bad = {name: target for name, target in resolved.items() if str(target).lower() in ("meta", "disk")}
        if bad:
            raise InvalidConfigError(f"device_map targets must hold the weights (CPU or GPU devices), got {bad}.")
    return resolved, memory


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``InvalidConfigError`` for a name torch does not know or a CUDA
    device this machine does not have (checked before any weights load)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidConfigError(f"device={device!r} is not a torch device ({error}).") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            hint = f"cuda:0 .. cuda:{count - 1}" if count else "torch.cuda.is_available() is False; use device='cpu'"
            raise InvalidConfigError(f"device={device!r}: this machine has {count} CUDA device(s) ({hint}).")
    return resolved


def targets_cuda(device_map: DeviceMap) -> bool:
    """Whether a map (a string map: whenever CUDA is present) puts modules on a GPU."""
    if isinstance(device_map, str):
        return torch.cuda.is_available()
    return any(str(target) != "cpu" for target in device_map.values())


def resolve_module_map(hf_model: Any, device_map: DeviceMap, max_memory: dict | None = None) -> dict:
    """A module-name -> device dict for ``hf_model`` (real or on the ``"meta"`` device).

    A string map is resolved by ``infer_auto_device_map`` (decoder layers are never split;
    ``"auto"`` / ``"balanced"`` balance the memory over the devices, ``"sequential"`` fills them
    in order); a dict is returned as it is."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if not isinstance(device_map, str):
        return dict(device_map)
    no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(hf_model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    return dict(infer_auto_device_map(hf_model, max_memory=max_memory, no_split_module_classes=no_split))


def build_on_devices(build: Callable[[], Any], device_map: DeviceMap, max_memory: dict | None, seed: int) -> Any:
    """A random-init HF model built straight onto the devices of ``device_map``: the capacity path
    for shapes whose host-side build would take minutes (a 32B or 70B model).

    ``build()`` runs on the ``"meta"`` device (no memory, no random numbers); each mapped module is
    then allocated on its device (``to_empty``) and initialised there by the model's own
    ``_init_weights`` (which also restores computed buffers such as the rotary ``inv_freq``), one
    module at a time under ``torch.manual_seed(seed + module index)``. So a parameter's values
    depend on the seed, its module and its device type only: the same on ``cuda:0`` and ``cuda:1``
    (CUDA's generator is the same on every GPU), so a model split over two GPUs and the same seed
    on one GPU (``device_map={"": 0}``) hold the same weights. (They differ from a build on the CPU,
    whose generator differs.) Returns the model with ``hf_device_map`` set; accelerate's hooks are
    attached by :func:`dispatch_layers`."""
    with torch.device("meta"):
        hf_model = build()
    module_map = resolve_module_map(hf_model, device_map, max_memory)
    for name, target in module_map.items():
        target = f"cuda:{target}" if isinstance(target, int) else target
        (hf_model.get_submodule(name) if name else hf_model).to_empty(device=target, recurse=True)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        for index, module in enumerate(hf_model.modules()):
            torch.manual_seed(seed + index)
            hf_model._init_weights(module)
    hf_model.tie_weights()
    return dispatch_layers(hf_model, module_map)


def dispatch_layers(hf_model: Any, device_map: DeviceMap, max_memory: dict | None = None) -> Any:
    """Place an already built HF model's modules per ``device_map`` with accelerate; in place.

    A string map is resolved by ``infer_auto_device_map`` (decoder layers are never split;
    ``"auto"`` / ``"balanced"`` balance the memory over the devices, ``"sequential"`` fills them
    in order). Hooks are attached even when every module lands on one device, so a map over
    ``"cpu"`` runs the same code as one over several GPUs. Sets ``hf_model.hf_device_map``.
    """
    from accelerate import dispatch_model

    device_map = resolve_module_map(hf_model, device_map, max_memory)
    # accelerate moves every tensor argument of the model's forward to the first device; the
    # ``logits_to_keep`` index must stay where the caller put it (the CPU: ``positions.logits_kwargs``),
    # since HF indexes the last layer's hidden states with it, on the last layer's device.
    dispatch_model(hf_model, device_map=device_map, force_hooks=True, skip_keys=["logits_to_keep"])
    hf_model.hf_device_map = dict(device_map)
    return hf_model


def layer_devices(model: Any) -> list[torch.device]:
    """The device of every block's attention weights, in layer order."""
    return [next(block.attn.parameters()).device for block in model.blocks]
