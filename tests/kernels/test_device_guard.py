"""Triton launches run on their tensors' device (device_guard), a no-op off CUDA."""

import ast
import contextlib
import importlib
from pathlib import Path

import pytest
import torch

from sparse_lens.kernels import device_guard
from sparse_lens.kernels.device_guard import cuda_device_of, launch_on_tensor_device

KERNEL_DIR = Path(device_guard.__file__).parent


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that reports ``cuda:1``, to see which device the guard enters."""

    @property
    def device(self):  # noqa: D401
        return torch.device("cuda", 1)


@pytest.fixture
def entered(monkeypatch):
    """Record the devices ``torch.cuda.device`` is entered with (no CUDA needed)."""
    log = []

    @contextlib.contextmanager
    def fake_device(device):
        log.append(("enter", torch.device(device)))
        yield
        log.append(("exit", torch.device(device)))

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    return log


def test_cpu_tensor_is_a_no_op(entered):
    tensor = torch.zeros(3)
    with cuda_device_of(tensor):
        pass
    calls = []
    launch = launch_on_tensor_device(lambda x, *, scale: calls.append(scale) or x + scale)
    assert torch.equal(launch(tensor, scale=2.0), tensor + 2.0)
    assert calls == [2.0] and entered == []


def test_cuda_tensor_launches_under_its_device(entered):
    fake = torch.zeros(3).as_subclass(_FakeCudaTensor)
    seen = []
    launch = launch_on_tensor_device(lambda grid, x: seen.append(list(entered)))
    launch((1, 2), fake)  # the first *tensor* argument names the device, not the first argument
    assert seen == [[("enter", torch.device("cuda", 1))]]
    assert entered[-1] == ("exit", torch.device("cuda", 1))
    launch_kw = launch_on_tensor_device(lambda **kw: None)
    launch_kw(query=fake)
    assert entered[-2] == ("enter", torch.device("cuda", 1))


def _launching_functions(path: Path) -> dict[str, bool]:
    """Every function that launches a kernel (``kernel[grid](...)``) -> whether it is guarded."""
    tree = ast.parse(path.read_text())
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        launches = any(isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)
                       for call in ast.walk(node))
        if launches:
            found[node.name] = any(getattr(d, "id", None) == "launch_on_tensor_device" for d in node.decorator_list)
    return found


# The public module of the attention kernels launches them through sparse_attention_fwd_triton /
# sparse_attention_bwd_triton (scanned here too); any launch of its own must still be guarded.
LAUNCHES_ELSEWHERE = {"sparse_attention_triton"}


@pytest.mark.parametrize("path", [path for path in sorted(KERNEL_DIR.glob("*_triton.py"))
                                  if not path.read_text().startswith('"""Deprecated path')],  # one-release shims
                         ids=lambda p: p.stem)
def test_every_triton_launch_is_guarded(path):
    launching = _launching_functions(path)
    assert launching or path.stem in LAUNCHES_ELSEWHERE, f"{path.name} launches no kernel?"
    assert all(launching.values()), f"unguarded launches in {path.name}: {launching}"
    module = importlib.import_module(f"sparse_lens.kernels.{path.stem}")
    for name in launching:
        assert hasattr(getattr(module, name), "__wrapped__")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernel_on_second_gpu_equals_reference():
    from sparse_lens.kernels.sparse_attention import block_sparse_attention
    from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 128, 32, generator=generator) for _ in range(3))
    indices = torch.tensor([[0, -1], [0, 1]]).expand(1, 2, 2, 2).contiguous()
    expected = block_sparse_attention(query, key, value, indices, query_block=64, key_block=64, scale=0.2)
    torch.cuda.set_device(0)
    got = block_sparse_attention_triton(*(t.to("cuda:1") for t in (query, key, value, indices)),
                                        query_block=64, key_block=64, scale=0.2)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine.cpu(), theirs, atol=1e-4, rtol=1e-4)
