"""A long forward without gradients holds a few residual-stream copies at its peak (chunked norms,
chunked rotary into contiguous buffers, q/k/v freed before the output projection, MLP chunks
written into one output), and none of that changes a result."""

import pytest
import torch
from transformers import LlamaConfig

import sparse_lens as sl
import sparse_lens.tl.attention as attention
from sparse_lens.tl.chunking import set_norm_chunking
from tests.conftest import sparse_and_dense, tiny_llama_config
from tests.tl.test_checkpointing import LiveBytes

D_MODEL = 512


def memory_model(monkeypatch, seq_len: int):
    """A bf16 Llama with Llama-3.1-8B's proportions where they matter here (d_head 128, 4 query heads
    per KV head, d_mlp = 3.5 d_model; d_model 512: the RoPE cos / sin, T x d_head each, weigh 0.25
    residual copies here, 1/32 in the 8B), MLP, norm and rotary chunks of T/16 (65,536 of 1M in the
    benchmark), and ``[1, seq_len]`` tokens. The Triton attention runs with its real wrapper and
    buffers but a no-op kernel, and the estimator is a fixed local pattern: memory is measured, not
    values (the estimators' wrappers allocate only ``[T / block, k]``-sized buffers)."""
    import sparse_lens.kernels.sparse_attention_triton as triton_attention

    def no_forward(query, key, value, block_indices, block_gate, output, lse, block_mass, *args, **kwargs):
        output.zero_(), lse.zero_(), block_mass.zero_()

    def local_blocks(query, key, *, geometry, **kwargs):
        n_blocks = -(-query.shape[2] // geometry.query_block)
        indices = torch.arange(n_blocks)[:, None] - torch.arange(geometry.top_k)[None]
        return indices.clamp(min=-1).expand(*query.shape[:2], n_blocks, geometry.top_k).to(torch.int32).contiguous()

    monkeypatch.setattr(triton_attention, "_launch_forward", no_forward)
    monkeypatch.setattr(attention, "estimate_blocks", local_blocks)
    monkeypatch.setattr(attention, "ROTARY_CHUNK_TOKENS", seq_len // 16)
    config = LlamaConfig(vocab_size=97, hidden_size=D_MODEL, intermediate_size=1792, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1 << 16)
    stream = sl.TracingConfig(query_block=64, key_block=64, top_k=4, keep_qk=False, backend="triton")
    model = sl.HookedSparseTransformer.from_config(config, stream, dtype=torch.bfloat16)
    model.mlp_chunk_tokens = seq_len // 16
    tokens = torch.randint(0, 97, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return model, tokens


def forward_peak(model, tokens) -> tuple[float, LiveBytes]:
    """Peak bytes created during a forward as ``benchmarks/model.py`` runs it (no gradients, every
    ``hook_pattern`` cached, last position's logits), in residual copies ``T x d_model x 2 bytes``."""
    recorder = LiveBytes()
    with torch.no_grad(), recorder:
        model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"), logits_to_keep=1)
    return recorder.peak / (tokens.shape[1] * D_MODEL * 2), recorder


def largest(recorder: LiveBytes, seq_len: int) -> list[tuple[float, str, tuple]]:
    """What was alive at the peak, largest first, in residual copies."""
    entries = sorted(recorder.at_peak.values(), reverse=True)[:8]
    return [(round(size / (seq_len * D_MODEL * 2), 3), op, shape) for size, op, shape in entries]


def test_forward_peak_is_a_few_residual_copies(monkeypatch):
    """Measured: 6.48 residual copies at either length, alive at the peak (rotating layer 1's
    queries): the embedding (HF's forward holds it to the end, 1), the residual stream (1), the
    attention's input norm (1), the q / k / v projections (1.5), the rotated q and k (1.25), RoPE's
    cos / sin (0.5 here, 1/16 in the 8B) and one rotary chunk's temporaries. Before: 11.56 with
    whole-sequence norms (TransformerLens' float32 hook values and HF's float32 upcast: four float32
    [T, d_model], the peak of the forward), 8.03 with whole-sequence rotary (q * cos, rotate_half(q),
    its product with sin)."""
    model, tokens = memory_model(monkeypatch, 1024)
    short, _ = forward_peak(model, tokens)
    model, tokens = memory_model(monkeypatch, 2048)
    lean, recorder = forward_peak(model, tokens)
    assert lean <= 6.6, f"{lean:.2f} residual copies; largest at the peak: {largest(recorder, 2048)}"
    assert abs(lean - short) <= 0.25  # per token: independent of T
    # The measurement catches each cut undone: whole-sequence norms, whole-sequence rotary.
    set_norm_chunking(model, None)
    whole_norms, _ = forward_peak(model, tokens)
    assert whole_norms >= lean + 4
    set_norm_chunking(model, model.mlp_chunk_tokens)
    monkeypatch.setattr(attention, "ROTARY_CHUNK_TOKENS", None)
    whole_rotary, _ = forward_peak(model, tokens)
    assert whole_rotary >= lean + 1.25


NAMES = ("hook_pattern", "ln1.hook_out", "ln2.hook_out", "ln_final.hook_out", "attn.hook_rot_q", "attn.hook_rot_k",
         "mlp.hook_out")


def cached_run(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=lambda name: name.endswith(NAMES))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_changes_no_result(monkeypatch, dtype):
    """Chunked norms and rotary give bit-identical logits, patterns and hook values to the forward
    before them (whole-sequence norms through TransformerLens' bridge and whole-sequence rotary; MLP
    chunks as before), on the reference kernels with the default estimator."""
    stream = sl.TracingConfig(query_block=16, key_block=16, top_k=3)
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, dtype=dtype)
    model.mlp_chunk_tokens = 48
    tokens = torch.randint(0, 101, (1, 200), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(attention, "ROTARY_CHUNK_TOKENS", 32)
    logits, cache = cached_run(model, tokens)
    set_norm_chunking(model, None)
    monkeypatch.setattr(attention, "ROTARY_CHUNK_TOKENS", None)
    before_logits, before = cached_run(model, tokens)
    assert torch.equal(logits, before_logits)
    assert sorted(cache.keys()) == sorted(before.keys()) and len(cache.keys()) == 2 * 6 + 1
    for name in before.keys():
        if name.endswith("hook_pattern"):
            for field in ("block_indices", "block_mass", "lse"):
                assert torch.equal(getattr(cache[name], field), getattr(before[name], field)), (name, field)
        else:
            assert cache[name].shape[1] == 200 and torch.equal(cache[name], before[name]), name


def test_a_hook_inside_a_norm_sees_the_whole_sequence():
    """A hook on ``hook_normalized`` / ``hook_scale`` runs the bridge's own computation, unchunked,
    and an edit there changes the output as it does without chunking."""
    model, _ = sparse_and_dense(tiny_llama_config(), sl.TracingConfig(query_block=16, key_block=16, top_k=3))
    tokens = torch.randint(0, 90, (1, 100), generator=torch.Generator().manual_seed(1))
    seen = []

    def halve(value, hook):
        seen.append(value.shape)
        return value * 0.5

    hooks = [("blocks.0.ln1.hook_normalized", halve), ("blocks.1.ln2.hook_scale", lambda value, hook: seen.append(value.shape))]
    with torch.no_grad():
        model.mlp_chunk_tokens = 32
        chunked = model.run_with_hooks(tokens, fwd_hooks=hooks)
        model.mlp_chunk_tokens = None
        whole = model.run_with_hooks(tokens, fwd_hooks=hooks)
        plain = model(tokens)
    assert seen == [(1, 100, 64), (1, 100, 1)] * 2
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(chunked, plain, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim, full_rotary", [(16, True), (8, True), (8, False)])
def test_chunked_rotary_equals_whole(rotary_dim, full_rotary, dtype):
    """Full, half-width (GPT-OSS: the halves repeated) and partial rotary (GPT-NeoX): chunks of 7
    positions, rotated in place into contiguous outputs, equal HF's whole-sequence formula bit for
    bit (bf16: each product rounded before the sum, as HF rounds it); queries in the bridge's
    [batch, pos, head, d] layout, transposed (not contiguous)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 30, 4, 16, generator=generator).to(dtype).transpose(1, 2)
    key = torch.randn(2, 2, 30, 16, generator=generator).to(dtype)
    cos = torch.randn(1, 30, rotary_dim, generator=generator).to(dtype)
    sin = torch.randn(1, 30, rotary_dim, generator=generator).to(dtype)
    whole = attention.apply_rotary(query, key, cos, sin, full_rotary=full_rotary)
    chunked = attention.apply_rotary(query, key, cos, sin, full_rotary=full_rotary, chunk_tokens=7)
    for expected, actual in zip(whole, chunked):
        assert actual.is_contiguous() and torch.equal(actual, expected)
    if rotary_dim == 16:  # the rotation is applied (the test sees a wrong formula)
        assert not torch.allclose(whole[0], query)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_long_rotary_on_the_kernel_equals_whole(monkeypatch, rotary_dim):
    """On CUDA (here: the interpreter, the kernel's condition forced) bf16 rotary of a long input runs
    the one-pass Triton kernel, whose outputs equal HF's whole-sequence formula bit for bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 30, 4, 16, generator=generator).bfloat16().transpose(1, 2).to(device)
    key = torch.randn(1, 2, 30, 16, generator=generator).bfloat16().to(device)
    cos, sin = (torch.randn(1, 30, rotary_dim, generator=generator).bfloat16().to(device) for _ in range(2))
    calls = []
    monkeypatch.setattr(attention, "_rotary_on_kernel", lambda *args: calls.append(1) or True)
    chunked = attention.apply_rotary(query, key, cos, sin, full_rotary=False, chunk_tokens=7)
    whole = attention.apply_rotary(query, key, cos, sin, full_rotary=False)
    assert calls == [1]
    for expected, actual in zip(whole, chunked):
        assert actual.is_contiguous() and torch.equal(actual, expected)
