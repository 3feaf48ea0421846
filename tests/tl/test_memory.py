"""free_bytes: the number the up-front ContextTooLongError checks compare with (every other test
replaces it, so its own reading of /proc/meminfo and of the CUDA allocator is checked here)."""

import io
import os

import pytest
import torch

from sparse_lens.tl import memory

MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    7000000 kB\nCached: 5 kB\n"


def test_cpu_free_memory_is_memavailable_in_bytes(monkeypatch):
    """MemAvailable (free plus reclaimable cache), not MemFree or MemTotal; /proc/meminfo counts kB."""
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO(MEMINFO), raising=False)
    assert memory.free_bytes(torch.device("cpu")) == 7_000_000 * 1024


def test_unknown_cpu_free_memory_refuses_nothing(monkeypatch):
    def no_meminfo(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(memory, "open", no_meminfo, raising=False)
    assert memory.free_bytes(torch.device("cpu")) == 2**63
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO("MemTotal: 5 kB\n"), raising=False)  # no MemAvailable
    assert memory.free_bytes(torch.device("cpu")) == 2**63


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_this_hosts_free_memory_is_positive_and_below_its_total():
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert 0 < memory.free_bytes(torch.device("cpu")) <= total


def test_cuda_free_memory_counts_pytorchs_unused_cache(monkeypatch):
    """Free on the device plus what PyTorch reserved and does not use (the allocator reuses it)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * 2**30)
    assert memory.free_bytes(torch.device("cuda", 0)) == (3 + 10 - 4) * 2**30
