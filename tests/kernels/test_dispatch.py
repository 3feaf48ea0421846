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


def _out_of_shared_memory(*args, **kwargs):
    """The launch failure of Gemma 3's d_head 256 in float32 on the H200 (raised before any write)."""
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(344320, 232448, "shared memory")


@pytest.mark.parametrize("kernel", ["stream", "bounds", "rescore_top_k", "rescore_top_p"])
def test_triton_launch_out_of_shared_memory_falls_back_to_the_reference(kernel, monkeypatch):
    from sparse_lens.kernels import bounds_triton, dispatch, rescore_triton, stream_triton
    from sparse_lens.kernels.blocks import BlockGeometry
    from tests.kernels.estimator_cases import device_qk

    # On the device the kernels run on: a CUDA host's GPU, else the CPU under the interpreter (the
    # Triton wrappers refuse CPU tensors on a CUDA host before the patched launch is reached).
    query, key = device_qk(0, q_heads=2, kv_heads=1, seq=96, d=16)
    geometry = BlockGeometry(query_block=16, key_block=16, top_k=3, sink_blocks=1, local_blocks=1)
    candidates = dispatch.stream_estimate_unchecked(query, key, geometry.replace(top_k=5), backend="reference")
    module, launch, run = {
        "stream": (stream_triton, "_launch_into", lambda backend: dispatch.stream_estimate_unchecked(
            query, key, geometry, backend=backend)),
        "bounds": (bounds_triton, "_launch", lambda backend: dispatch.bounds_estimate_unchecked(
            query, key, geometry, backend=backend)),
        "rescore_top_k": (rescore_triton, "_launch", lambda backend: dispatch.rescore_top_k_unchecked(
            query, key, candidates, geometry, backend=backend)),
        "rescore_top_p": (rescore_triton, "_launch", lambda backend: dispatch.rescore_top_p_unchecked(
            query, key, candidates, geometry, p=0.9, min_blocks=2, backend=backend)),
    }[kernel]
    monkeypatch.setattr(module, launch, _out_of_shared_memory)
    with pytest.warns(RuntimeWarning) as caught:
        result = run("triton")
    message = str(caught[0].message)
    assert f"{module.__name__.rsplit('.', 1)[-1]}." in message, message  # names the kernel's module
    assert all(text in message for text in ("d_head 16", "float32", "344320", "232448", "shared memory")), message
    assert torch.equal(result, run("reference"))
