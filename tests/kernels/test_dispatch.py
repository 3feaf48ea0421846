"""Backend choice, and the whole model on the Triton kernels (CPU interpreter here, CUDA on a GPU)."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels.dispatch import use_triton
from tests.conftest import sparse_and_dense, tiny_llama_config


def test_backend_resolution():
    cpu = torch.zeros(1)
    assert not use_triton("auto", cpu, 64, 64)
    assert use_triton("triton", cpu, 64, 64) and not use_triton("reference", cpu, 64, 64)
    with pytest.raises(sl.InvalidConfigError):
        use_triton("cuda", cpu, 64, 64)
    with pytest.raises(sl.InvalidConfigError):
        sl.StreamConfig(backend="fast")


def test_model_on_triton_kernels_matches_the_reference_backend():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3, backend="reference")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: the GPU, or the CPU interpreter
    model, _ = sparse_and_dense(tiny_llama_config(), stream)
    model.to(device)
    tokens = torch.randint(0, 90, (1, 90), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference_logits, reference_cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
        with model.stream_settings(backend="triton"):
            triton_logits, triton_cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    torch.testing.assert_close(triton_logits, reference_logits, atol=1e-4, rtol=1e-4)
    reference, triton = reference_cache["blocks.1.attn.hook_pattern"], triton_cache["blocks.1.attn.hook_pattern"]
    assert torch.equal(triton.block_indices, reference.block_indices)
    torch.testing.assert_close(triton.block_mass, reference.block_mass, atol=1e-5, rtol=1e-5)
