"""Fused replacements of HF layers in chunked forwards (tl.fused_layers): found by form, checked
against the module, refused for other forms."""

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

import sparse_lens as sl
import sparse_lens.tl.fused_layers as fused_layers
from sparse_lens.tl.fused_layers import fused_gated_mlp, fused_rms_norm
from tests.conftest import tiny_qwen2_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the kernel runs under TRITON_INTERPRET=1


class _GemmaStyleNorm(torch.nn.Module):
    """Gemma's RMSNorm form: ``1 + weight``, applied in float32 before the cast."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(weight), eps

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_reproduces_the_llama_form_and_refuses_others(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, generator=generator) * 0.3 + 1.0).to(dtype)  # not ones: a dropped weight shows
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    x = (torch.randn(2, 100, 48, generator=generator) * 3).to(dtype)
    fused = fused_rms_norm(norm, x[:, :8])
    assert fused is not None
    assert torch.equal(fused(x), norm(x))  # bit-identical on the CPU
    assert fused_rms_norm(_GemmaStyleNorm(weight.float() - 1.0).to(dtype), x[:, :8]) is None
    assert fused_rms_norm(torch.nn.LayerNorm(48).to(dtype), x[:, :8]) is None  # no variance_epsilon / eps float
    assert fused_rms_norm(norm, x[:, :0]) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama.LlamaRMSNorm", "qwen2.Qwen2RMSNorm"])
def test_fused_rms_norm_on_the_kernel_is_hf_bit_for_bit(monkeypatch, family, dtype):
    """The kernel path (CUDA bf16 / fp16) equals HF's module bit for bit: on a zero position,
    large values, a non-contiguous chunk (batch 2) and with the variance computed in pieces."""
    import importlib
    from functools import partial

    from sparse_lens.kernels.rms_norm_triton import inverse_rms_triton

    module, name = family.split(".")
    norm = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)(48, eps=1e-5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=generator) * 0.3 + 1.0)
    x = torch.randn(2, 100, 48, generator=generator) * 3
    x[0, 5] = 0.0
    x[1, 7] *= 1e3
    norm, x = norm.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE)
    calls = []
    if DEVICE == "cpu":  # the interpreter runs the kernel
        monkeypatch.setattr(fused_layers, "_rms_norm_on_kernel", lambda probe, weight: True)
    real = fused_layers.rms_norm_triton
    monkeypatch.setattr(fused_layers, "rms_norm_triton", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        fused = fused_rms_norm(norm, x[:, :8])
        assert fused is not None and calls  # the probe ran on the kernel
        chunk = x[:, 10:90]  # a chunk of a batch of two: not contiguous
        assert torch.equal(fused(chunk), norm(chunk))
        monkeypatch.setattr(fused_layers, "inverse_rms_triton",
                            partial(inverse_rms_triton, piece_elements=1000, min_positions=16))
        assert torch.equal(fused(x), norm(x))  # variance in 6 pieces of 16 or 17 positions (32+ rows)
    # with a weight that needs a gradient the torch path keeps autograd (the kernel has no backward)
    calls.clear()
    assert fused_rms_norm(norm, x[:, :8]) is not None and not calls


def test_fused_rms_norm_kernel_path_refuses_a_module_it_does_not_reproduce_exactly(monkeypatch):
    """On the kernel path (exact) one element off by one unit in the last place refuses the fused
    norm, though it is within what the torch path allows (RARE of the probe's 3,072 elements)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OneUlpOff(LlamaRMSNorm):
        def forward(self, hidden_states):
            out = super().forward(hidden_states).clone()  # bf16
            out.view(torch.int16).view(-1)[0] += 1  # the next bf16 value (away from zero) in one element
            return out

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 64, 48, generator=generator).to(torch.bfloat16).to(DEVICE)
    if DEVICE == "cpu":  # the interpreter runs the kernel
        monkeypatch.setattr(fused_layers, "_rms_norm_on_kernel", lambda probe, weight: True)
    with torch.no_grad():
        assert fused_rms_norm(LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16).to(DEVICE), x) is not None
        assert fused_rms_norm(OneUlpOff(48, eps=1e-5).to(torch.bfloat16).to(DEVICE), x) is None


def test_fused_rms_norm_keeps_gradients_the_kernel_cannot_give(monkeypatch):
    """The kernel path has no backward: with gradients on, an input or a weight that needs a
    gradient is normed by the module itself (HF's autograd), whatever mode the probe ran in."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16).to(DEVICE)
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 20, 48, generator=generator) * 3).to(torch.bfloat16).to(DEVICE)
    if DEVICE == "cpu":  # the interpreter runs the kernel
        monkeypatch.setattr(fused_layers, "_rms_norm_on_kernel", lambda probe, weight: True)
    norm.weight.requires_grad_(False)
    fused = fused_rms_norm(norm, x[:, :8])  # with gradients on, nothing needs one: the kernel path
    assert fused is not None
    leaf = x.clone().requires_grad_(True)
    fused(leaf).float().sum().backward()
    expected = leaf.clone().detach().requires_grad_(True)
    norm(expected).float().sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, expected.grad)
    norm.weight.requires_grad_(True)
    with torch.no_grad():
        fused = fused_rms_norm(norm, x[:, :8])  # probed without gradients: the kernel path
    assert fused is not None
    fused(x).float().sum().backward()  # called with gradients on: the weight's gradient is kept
    assert norm.weight.grad is not None


def test_long_forward_runs_the_norm_kernel_and_changes_nothing(monkeypatch):
    """Chunked norms on the kernel give the same logits, bit for bit, as HF's norms on the same
    chunks (the MLPs stay HF's in both runs, so nothing else differs). The norm weights are made
    random: at HF's initial ones a kernel rounding once instead of twice would not show."""
    from sparse_lens.tl import chunking

    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4)
    sparse = sl.HookedSparseTransformer.from_config(tiny_qwen2_config(), stream, dtype=torch.bfloat16, device=DEVICE)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in sparse.named_parameters():
            if name.endswith("norm._original_component.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + 1.0)
    tokens = torch.randint(0, 90, (1, 150), generator=generator).to(DEVICE)
    monkeypatch.setattr(chunking, "fused_gated_mlp", lambda *args: None)
    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_rms_norm_on_kernel", lambda probe, weight: True)
    calls = []
    real = fused_layers.rms_norm_triton
    monkeypatch.setattr(fused_layers, "rms_norm_triton", lambda *args: calls.append(1) or real(*args))
    sparse.mlp_chunk_tokens = 64
    with torch.no_grad():
        fused = sparse(tokens)
        assert len(calls) >= 3 * (2 * sparse.cfg.n_layers + 1)  # three chunks of every norm (and the probes)
        monkeypatch.setattr(chunking, "fused_rms_norm", lambda *args: None)  # HF's norms on the chunks
        assert torch.equal(fused, sparse(tokens))


def gated_mlp(hidden_act="silu", seed=0):
    torch.manual_seed(seed)
    return Qwen2MLP(Qwen2Config(hidden_size=32, intermediate_size=64, hidden_act=hidden_act)).bfloat16()


def test_fused_gated_mlp_reproduces_the_silu_form_on_the_kernel(monkeypatch):
    mlp = gated_mlp()
    x = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert fused_gated_mlp(mlp, x[:, :8]) is None  # a CPU tensor: not the kernel's
    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)  # the interpreter runs it
    mlp, x = mlp.to(DEVICE), x.to(DEVICE)
    with torch.no_grad():  # as chunked forwards call it (with gradients on it refuses: the kernel has no backward)
        fused = fused_gated_mlp(mlp, x[:, :8])
        assert fused is not None
        expected, got = mlp(x), fused(x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert fused_gated_mlp(gated_mlp("gelu").to(DEVICE), x[:, :8]) is None  # another activation
    del mlp.up_proj
    assert fused_gated_mlp(mlp, x[:, :8]) is None  # another form


def test_fused_gated_mlp_keeps_gradients_the_kernel_cannot_give(monkeypatch):
    """Probed without gradients, then called with them on: an input or a parameter needing a
    gradient runs the module itself (the SiLU-and-product kernel has no backward)."""
    mlp = gated_mlp().to(DEVICE)
    x = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEVICE)
    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)
    with torch.no_grad():
        fused = fused_gated_mlp(mlp, x[:, :8])
    assert fused is not None
    fused(x).float().sum().backward()  # the parameters need gradients
    assert all(p.grad is not None for p in mlp.parameters())
    mlp.requires_grad_(False)
    leaf = x.clone().requires_grad_(True)
    fused(leaf).float().sum().backward()
    expected = x.clone().requires_grad_(True)
    mlp(expected).float().sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, expected.grad)


def test_long_forward_runs_the_fused_mlp(monkeypatch):
    import sparse_lens.kernels.swiglu_triton as swiglu_triton

    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4)
    sparse = sl.HookedSparseTransformer.from_config(tiny_qwen2_config(), stream, dtype=torch.bfloat16, device=DEVICE)
    tokens = torch.randint(0, 90, (1, 150), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    calls = []
    real = swiglu_triton.silu_mul_triton
    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)
    monkeypatch.setattr(fused_layers, "silu_mul_triton", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        logits = sparse(tokens)
        sparse.mlp_chunk_tokens = 64
        chunked = sparse(tokens)
    assert len(calls) >= 3 * sparse.cfg.n_layers  # three chunks of every MLP (and the probes)
    torch.testing.assert_close(chunked, logits, atol=5e-2, rtol=5e-2)


def test_fused_gated_mlp_refuses_a_module_returning_a_tuple(monkeypatch):
    class RoutedMLP(torch.nn.Module):  # the gated form's parts, but (hidden states, router scores) out
        def __init__(self):
            super().__init__()
            self.inner = gated_mlp()
            self.gate_proj, self.up_proj = self.inner.gate_proj, self.inner.up_proj
            self.down_proj, self.act_fn = self.inner.down_proj, self.inner.act_fn

        def forward(self, x):
            return self.inner(x), x.sum(-1)

    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEVICE)
    assert fused_gated_mlp(RoutedMLP().to(DEVICE), x) is None


@pytest.mark.parametrize("norm_class", ["olmo2.Olmo2RMSNorm", "gpt_oss.GptOssRMSNorm"])
def test_fused_rms_norm_refuses_a_norm_that_rounds_once_after_the_weight(norm_class):
    """OLMo-2's and GPT-OSS' RMSNorms multiply by the weight in float32 and round once: within one
    rounding of the Llama form everywhere, but a quarter of the bf16 outputs differ by one unit in
    the last place, which a fused norm would change silently (it must keep the module's forward)."""
    import importlib

    family, name = norm_class.split(".")
    norm = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)(48)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=generator) * 0.3 + 1.0)
    norm = norm.bfloat16()
    x = (torch.randn(2, 64, 48, generator=generator) * 3).bfloat16()
    llama_form = norm.weight * torch.rms_norm(x, (48,), None, norm.variance_epsilon)
    assert (llama_form != norm(x)).float().mean() > 0.1  # the two forms round differently
    assert fused_rms_norm(norm, x) is None


class _ScaledMLP(torch.nn.Module):
    """The gated SiLU MLP's parts, with the product (``inside``) or the output scaled by ``factor``."""

    def __init__(self, factor: float, inside: bool):
        super().__init__()
        self.inner, self.factor, self.inside = gated_mlp(), factor, inside
        self.gate_proj, self.up_proj = self.inner.gate_proj, self.inner.up_proj
        self.down_proj, self.act_fn = self.inner.down_proj, self.inner.act_fn

    def forward(self, x):
        if self.inside:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * self.factor)
        return self.inner(x) * self.factor


@pytest.mark.parametrize("inside", [True, False], ids=["scaled-product", "scaled-output"])
def test_fused_gated_mlp_refuses_a_slightly_scaled_form(monkeypatch, inside):
    # a 1% scale is within bf16's "close" on most elements but changes every output
    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(4)).bfloat16().to(DEVICE)
    with torch.no_grad():
        assert fused_gated_mlp(_ScaledMLP(1.0, inside).to(DEVICE), x) is not None  # the form itself is taken
        assert fused_gated_mlp(_ScaledMLP(1.01, inside).to(DEVICE), x) is None


def test_no_fused_mlp_with_gradients_on(monkeypatch):
    """With gradients on and an input that needs none (e.g. frozen layers before a trained MLP),
    the chunked MLP must keep the module's forward: the kernel has no backward, so the gate and up
    projections' gradients would be lost."""
    from sparse_lens.tl.checkpointing import RecomputeState
    from sparse_lens.tl.chunking import _chunked_forward

    if DEVICE == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)
    mlp = gated_mlp().to(DEVICE)
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)
    with torch.no_grad():
        assert fused_gated_mlp(mlp, x) is not None  # the form is taken without gradients
    assert fused_gated_mlp(mlp, x) is None
    mlp(x).float().square().sum().backward()
    expected = mlp.gate_proj.weight.grad.clone()
    mlp.zero_grad()
    _chunked_forward(mlp, mlp.forward, 16, RecomputeState(), [], set(), x).float().square().sum().backward()
    assert mlp.gate_proj.weight.grad is not None
    torch.testing.assert_close(mlp.gate_proj.weight.grad, expected, atol=2e-2, rtol=2e-2)  # bf16, summed by chunks
