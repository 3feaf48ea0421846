import pytest
import torch

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_qwen2_config


def test_mlp_chunking_keeps_logits_and_hooks():
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 90, (1, 150), generator=torch.Generator().manual_seed(0))
    names = lambda name: name.endswith("mlp.hook_out")  # noqa: E731
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens, names_filter=names)
        sparse.mlp_chunk_tokens = 32
        chunked_logits, chunked_cache = sparse.run_with_cache(tokens, names_filter=names)
        sparse.mlp_chunk_tokens = None
        again = sparse(tokens)
    torch.testing.assert_close(chunked_logits, logits, atol=1e-5, rtol=1e-5)
    assert chunked_cache["blocks.1.mlp.hook_out"].shape == (1, 150, 96)
    torch.testing.assert_close(chunked_cache["blocks.1.mlp.hook_out"], cache["blocks.1.mlp.hook_out"], atol=1e-5, rtol=1e-5)
    assert torch.equal(again, logits)


def test_logits_to_keep_returns_only_the_last_positions():
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 90, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(tokens, logits_to_keep=1), sparse(tokens)[:, -1:])


def test_hooks_inside_a_chunked_mlp_see_the_whole_sequence_and_keep_gradients():
    """A hook inside the MLP bridge (mlp.hook_pre, its linear layers' hooks) fired once per chunk:
    run_with_cache kept the last chunk's [batch, chunk, d] only; with gradients an editing hook
    removed by run_with_hooks before the backward was missing from the chunks' recomputation
    (gradients off by ~1e-2). With such a hook the MLP runs unchunked, as the norms do."""
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 90, (1, 64), generator=torch.Generator().manual_seed(0))
    inner = [name for name in sparse.hook_dict if name.startswith("blocks.1.mlp.")
             and name not in ("blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out")]
    assert "blocks.1.mlp.hook_pre" in inner

    def run(chunk_tokens):
        sparse.mlp_chunk_tokens = chunk_tokens
        with torch.no_grad():
            _, cache = sparse.run_with_cache(tokens, names_filter=lambda name: name in inner)
        sparse.zero_grad(set_to_none=True)
        kept = {}
        logits = sparse.run_with_hooks(tokens, fwd_hooks=[
            ("blocks.1.mlp.hook_pre", lambda value, hook: value * 1.5),
            ("blocks.0.hook_resid_post", lambda value, hook: kept.setdefault("resid", value))])
        kept["resid"].retain_grad()
        logits[0, -4:].logsumexp(-1).sum().backward()
        sparse.mlp_chunk_tokens = None
        return cache, kept["resid"].grad

    try:
        cache, grad = run(None)
        chunked_cache, chunked_grad = run(16)
    finally:
        sparse.mlp_chunk_tokens = None
    for name in inner:
        assert chunked_cache[name].shape == cache[name].shape, name
        torch.testing.assert_close(chunked_cache[name], cache[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_grad, grad, atol=1e-5, rtol=1e-4)


def test_chunk_tokens_must_be_a_positive_int():
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    for bad in (0, -1, 2.5, True, "16"):
        with pytest.raises(sl.InvalidConfigError, match="chunk_tokens"):
            sparse.mlp_chunk_tokens = bad
    assert sparse.mlp_chunk_tokens is None


def test_an_mlp_returning_a_tuple_runs_unchunked():
    """gpt-oss' MoE returns (hidden states, router scores of the flattened tokens): chunking it
    raised "'tuple' object has no attribute 'new_empty'" (and could not be concatenated under grad)."""
    from tests.tl.test_families_gpt_oss import _sparse

    model = _sparse(16, sl.TracingConfig(query_block=16, key_block=16, top_k=2, sink_blocks=1, local_blocks=1))[0]
    tokens = torch.randint(0, 101, (2, 64), generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            logits = model(tokens)
        model.zero_grad(set_to_none=True)
        model(tokens)[:, -4:].logsumexp(-1).sum().backward()
        return logits, [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]

    logits, grads = run()
    model.mlp_chunk_tokens = 16
    try:
        chunked_logits, chunked_grads = run()
    finally:
        model.mlp_chunk_tokens = None
    torch.testing.assert_close(chunked_logits, logits, atol=0, rtol=0)
    for chunked, plain in zip(chunked_grads, grads):
        torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)


def test_long_forward_runs_the_fused_norm_and_changes_no_result(monkeypatch):
    import sparse_lens.tl.fused_layers as fused_layers

    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 90, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = sparse(tokens)
        sparse.mlp_chunk_tokens = 64
        calls = []
        real = torch.rms_norm
        monkeypatch.setattr(fused_layers.torch, "rms_norm", lambda *args: calls.append(1) or real(*args))
        chunked = sparse(tokens)
    assert len(calls) >= 3 * (2 * sparse.cfg.n_layers + 1)  # three chunks of every block norm and the final norm
    assert torch.equal(chunked, logits)


def _fused_mlp_model(monkeypatch, seq_len: int, seed: int):
    """A tiny bf16 Qwen2 model with the fused MLP on (on the CPU forced, the kernel under the
    interpreter), ``seq_len`` tokens, and the positions of every SiLU-and-product kernel call."""
    import sparse_lens.tl.fused_layers as fused_layers

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1
    if device == "cpu":
        monkeypatch.setattr(fused_layers, "_swiglu_on_kernel", lambda probe: True)
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4)
    sparse = sl.HookedSparseTransformer.from_config(tiny_qwen2_config(), stream, dtype=torch.bfloat16, device=device)
    tokens = torch.randint(0, 90, (1, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    positions = []
    real = fused_layers.silu_mul_triton
    monkeypatch.setattr(fused_layers, "silu_mul_triton", lambda *args: positions.append(args[0].shape[-2]) or real(*args))
    return sparse, tokens, positions


def test_chunks_shorter_than_the_probe_run_the_fused_mlp(monkeypatch):
    """mlp_chunk_tokens below fused_layers.PROBE_POSITIONS: the probe that checks the fused MLP
    against the module must not itself be chunked (it recursed until RecursionError)."""
    import sparse_lens.tl.fused_layers as fused_layers

    sparse, tokens, calls = _fused_mlp_model(monkeypatch, 100, seed=3)
    with torch.no_grad():
        logits = sparse(tokens)
        sparse.mlp_chunk_tokens = 16
        chunked = sparse(tokens)
    assert 16 < fused_layers.PROBE_POSITIONS
    assert len(calls) == sparse.cfg.n_layers * (1 + 7)  # per MLP the probe and 7 chunks of at most 16
    torch.testing.assert_close(chunked, logits, atol=5e-2, rtol=5e-2)


def test_an_mlp_with_a_hook_inside_runs_unfused(monkeypatch):
    """An editing hook inside one MLP (blocks.1.mlp.hook_pre) with the fused MLP on (forced as on
    CUDA): that MLP runs whole and unfused, so the edit applies as without chunks (the kernel
    between the projections would skip it); the other MLP still runs fused."""
    sparse, tokens, shapes = _fused_mlp_model(monkeypatch, 64, seed=4)
    hooks = [("blocks.1.mlp.hook_pre", lambda value, hook: value * 1.5)]
    with torch.no_grad():
        logits = sparse.run_with_hooks(tokens, fwd_hooks=hooks)
        sparse.mlp_chunk_tokens = 32
        chunked = sparse.run_with_hooks(tokens, fwd_hooks=hooks)
        assert shapes == [32, 32, 32]  # layer 0 only: its probe and 2 chunks
        plain = sparse(tokens)
    assert len(shapes) == 3 + 2 * 3  # without the hook both layers run fused
    torch.testing.assert_close(chunked, logits, atol=5e-2, rtol=5e-2)
    assert not torch.allclose(plain, logits, atol=5e-2, rtol=5e-2)  # the edit matters
