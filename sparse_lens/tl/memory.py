"""Free memory on a device, for the up-front checks that raise ``ContextTooLongError`` (observe
mode's dense attention, full-vocabulary logits in fidelity) before a request would fail halfway:
on the CPU an out-of-memory process is killed without a Python error.
"""

from __future__ import annotations

import contextlib

import torch


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: CUDA free plus PyTorch's unused cache; on the CPU
    the kernel's MemAvailable (unbounded where the platform does not say)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**63  # free memory unknown (no /proc/meminfo): refuse nothing
