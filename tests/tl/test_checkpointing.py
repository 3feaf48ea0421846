"""Block checkpointing (per block or by segments, MLP and norm chunks too) gives the plain backward's
gradients, and its backward holds a few residual-stream copies per token."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Qwen2Config

import sparse_lens as sl
from sparse_lens.errors import InvalidConfigError
from sparse_lens.tl.checkpointing import checkpoint_blocks, is_recomputing, segments
from tests.conftest import sparse_and_dense, tiny_llama_config

TOKENS = torch.randint(0, 90, (1, 96), generator=torch.Generator().manual_seed(0))


def gradients(model, *, lean: bool, offload: bool = False, segment_layers=None):
    """Gradients of a last-position logit difference w.r.t. the embedding output, every parameter and
    layer 0's block gates; plus how often each hook_pattern hook ran while recomputing."""
    parameters = [p for p in model.blocks.parameters() if p.requires_grad]  # the embedding output is a leaf
    passes = {"first": 0, "recompute": 0}
    gates = {}

    def embed_leaf(value, hook):
        gates["embed"] = value.detach().requires_grad_(True)
        return gates["embed"]

    def gate_hook(pattern, hook):
        passes["recompute" if is_recomputing(model) else "first"] += 1
        gate = gates.setdefault("gate", torch.ones_like(pattern.block_mass, requires_grad=True))
        return pattern.with_gate(gate)

    hooks = [("hook_embed", embed_leaf), ("blocks.0.attn.hook_pattern", gate_hook)]
    context = checkpoint_blocks(model, offload=offload, segment_layers=segment_layers) if lean else torch.enable_grad()
    with context, model.hooks(fwd_hooks=hooks), torch.enable_grad():
        logits = model(TOKENS, logits_to_keep=1)
        value = logits[0, -1, 3] - logits[0, -1, 8]
        grads = torch.autograd.grad(value, [gates["embed"], gates["gate"], *parameters])
    return grads, passes


@pytest.mark.parametrize("offload, segment_layers", [(False, None), (True, None), (False, 2), (True, "sqrt")])
def test_checkpointed_gradients_equal_plain_gradients(offload, segment_layers, monkeypatch):
    import sparse_lens.tl.attention as attention

    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    model.mlp_chunk_tokens = 40  # MLP and norm chunks are checkpointed too
    estimates = []
    estimate_blocks = attention.estimate_blocks
    monkeypatch.setattr(attention, "estimate_blocks", lambda *args, **kwargs: estimates.append(1) or
                        estimate_blocks(*args, **kwargs))
    plain, plain_passes = gradients(model, lean=False)
    assert len(estimates) == 3
    lean, lean_passes = gradients(model, lean=True, offload=offload, segment_layers=segment_layers)
    assert len(estimates) == 6  # the recomputations reuse the first pass's block selection
    assert plain_passes == {"first": 1, "recompute": 0}
    # Block 0 really was recomputed: once, or twice when its segment (blocks 0 and 1) is recomputed first.
    assert lean_passes == {"first": 1, "recompute": 1 if segment_layers is None else 2}
    assert plain[1].abs().sum() > 0 and plain[0].abs().sum() > 0
    for expected, actual in zip(plain, lean):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    # Nothing is left installed: forwards without the context are plain again.
    assert "forward" not in model.blocks[0].__dict__ and "_python_norm_forward" not in model.blocks[0].ln1.__dict__


def test_segments():
    assert segments(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert segments(28, "sqrt") == [range(start, min(start + 6, 28)) for start in range(0, 28, 6)]
    assert segments(2, None) == [range(0, 1), range(1, 2)]
    # Cut where the attention type changes (one mask per segment).
    types = ["full", "full", "sliding", "sliding", "sliding", "full", "full"]
    assert segments(7, 3, types) == [range(0, 2), range(2, 3), range(3, 5), range(5, 6), range(6, 7)]
    with pytest.raises(InvalidConfigError):
        segments(4, 0)


def test_checkpointing_changes_no_forward_and_nests():
    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    with torch.no_grad():
        plain = model(TOKENS)
    with model.lean_backward() as outer, checkpoint_blocks(model) as inner:
        assert inner is outer
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), plain)
    assert not outer.installed


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes need Python 3.11")
def test_out_of_memory_inside_the_lean_backward_keeps_its_type_and_says_what_to_lower():
    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=5), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    with pytest.raises(torch.OutOfMemoryError) as caught, checkpoint_blocks(model, segment_layers=4):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.")
    note = "\n".join(caught.value.__notes__)
    assert "up to 4 blocks; 2 segments" in note and "segment_layers=2" in note and "offload=True" in note
    with pytest.raises(torch.OutOfMemoryError) as caught, checkpoint_blocks(model, segment_layers=None, offload=True):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    note = "\n".join(caught.value.__notes__)
    assert "up to 1 blocks" in note and "segment_layers=" not in note and "offload=True" not in note
    with pytest.raises(ValueError) as other, checkpoint_blocks(model):
        raise ValueError("not memory")
    assert not getattr(other.value, "__notes__", None)  # only memory errors get the advice


# ----- the working set of one block's recompute and backward, in residual-stream copies -----------------
class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that ops create while the mode is on and that are still alive: the peak,
    and what was alive at the peak (bytes, op, shape). Views and in-place results are not new."""

    def __init__(self):
        super().__init__()
        self.live, self.total, self.peak, self.at_peak = {}, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in inputs and pointer not in self.live:
                self.live[pointer] = (storage.nbytes(), str(func), tuple(tensor.shape))
                self.total += storage.nbytes()
                weakref.finalize(storage, self._free, pointer)
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.live)
        return out

    def _free(self, pointer):
        entry = self.live.pop(pointer, None)
        if entry is not None:
            self.total -= entry[0]


def memory_model(monkeypatch, seq_len: int, n_layers: int = 2):
    """A bf16 Qwen2-like model for memory measurements (d_mlp = 6 d_model, 12 query / 2 KV heads as
    Qwen2.5-1.5B, MLP chunks of T/16, parameters frozen) and ``[1, seq_len]`` tokens. The Triton
    attention runs with its real wrapper and buffers (what the GPU allocates: its kernels keep
    everything else in registers) but no-op kernels, and the estimator is replaced by a fixed local
    pattern: only memory is measured (fast on the CPU), not values. Residual copy: T x 192 x 2 bytes."""
    import sparse_lens.kernels.sparse_attention_triton as triton_attention
    import sparse_lens.tl.attention as attention

    def no_forward(query, key, value, block_indices, block_gate, output, lse, block_mass, *args, **kwargs):
        output.zero_(), lse.zero_(), block_mass.zero_()

    def no_backward(query, key, value, block_indices, block_gate, output, grad_output, lse, grad_query, *args, **kwargs):
        grad_query.zero_()

    def local_blocks(query, key, *, geometry, **kwargs):
        n_blocks = -(-query.shape[2] // geometry.query_block)
        indices = torch.arange(n_blocks)[:, None] - torch.arange(geometry.top_k)[None]
        return indices.clamp(min=-1).expand(*query.shape[:2], n_blocks, geometry.top_k).to(torch.int32).contiguous()

    monkeypatch.setattr(triton_attention, "_launch_forward", no_forward)
    monkeypatch.setattr(triton_attention, "_launch_backward", no_backward)
    monkeypatch.setattr(attention, "estimate_blocks", local_blocks)
    config = Qwen2Config(vocab_size=97, hidden_size=192, intermediate_size=1152, num_hidden_layers=n_layers,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=1 << 16)
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, keep_qk=False, backend="triton")
    model = sl.HookedSparseTransformer.from_config(config, stream, dtype=torch.bfloat16)
    model.mlp_chunk_tokens = seq_len // 16
    model.requires_grad_(False)  # as attribution_patching runs it: no weight gradient, nothing saved for one
    tokens = torch.randint(0, 97, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return model, tokens


def backward_working_set(monkeypatch, seq_len: int, chunk_tokens: int | None = None) -> tuple[float, LiveBytes]:
    """Peak bytes created during the checkpointed backward of :func:`memory_model` (2 blocks), in
    residual copies. Blocks are checkpointed one by one (segments add their block inputs, counted
    apart in ``benchmarks/circuits.py``'s estimate)."""
    model, tokens = memory_model(monkeypatch, seq_len)
    leaf = {}

    def embed_leaf(value, hook):
        leaf["embed"] = value.detach().requires_grad_(True)
        return leaf["embed"]

    recorder = LiveBytes()
    with checkpoint_blocks(model, segment_layers=None, chunk_tokens=chunk_tokens), \
            model.hooks(fwd_hooks=[("hook_embed", embed_leaf)]), \
            torch.enable_grad():
        logits = model(tokens, logits_to_keep=1)
        value = logits[0, -1, 1].float() - logits[0, -1, 2].float()
        with recorder:
            torch.autograd.grad(value, [leaf["embed"]])
    return recorder.peak / (seq_len * 192 * 2), recorder


def test_backward_working_set_is_a_few_residual_copies_per_token(monkeypatch):
    """Measured: 8.6 residual copies at either length, alive at the peak (in the MLP backward of a
    block): both norm outputs (the q/k/v and MLP inputs, 2), the residual after attention (1), q made
    contiguous and the attention output (2), the attention's lse, k and v (0.5), one MLP chunk's
    intermediates and the chunks' input gradients (~3). Before the norms were chunked: 17.5 (the
    fp32 RMSNorm backward: seven fp32 [T, d_model] temporaries). Parameters needing gradients add
    2.1 copies (the linears' inputs, saved for the weight gradients)."""
    short, _ = backward_working_set(monkeypatch, 512)
    long, recorder = backward_working_set(monkeypatch, 1024)
    at_peak = sorted(recorder.at_peak.values(), reverse=True)[:6]
    assert long <= 9.5, f"{long:.1f} residual copies; largest at the peak: {at_peak}"
    assert abs(long - short) <= 0.5  # per token: independent of T
    # The measurement catches a regression: whole-sequence norms (chunks longer than T) cost 8+ copies more.
    unchunked, _ = backward_working_set(monkeypatch, 1024, chunk_tokens=1 << 20)
    assert unchunked >= long + 8
