"""No tensor with T x T elements or more may be created during a sparse forward pass."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ = 1024


class LargestTensor(TorchDispatchMode):
    """Records the element count and shape of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None, None)
        self.largest_backward_op = 0  # largest output of an aten *_backward op (the scan sees the backward)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest[0]:
                self.largest = (tensor.numel(), tuple(tensor.shape), str(func))
            if isinstance(tensor, torch.Tensor) and "backward" in str(func):
                self.largest_backward_op = max(self.largest_backward_op, tensor.numel())
        return out


def largest_tensor(model, tokens):
    with torch.no_grad(), LargestTensor() as recorder:
        model.run_with_cache(tokens)
    return recorder.largest


def test_sparse_forward_creates_no_quadratic_tensor():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, keep_qk=True)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    numel, shape, op = largest_tensor(sparse, tokens)
    assert numel < SEQ * SEQ, f"{op} created a tensor of shape {shape}"
    # The detector does catch the dense bridge (so this test can fail).
    numel, shape, op = largest_tensor(dense, tokens)
    assert numel >= SEQ * SEQ


def test_observe_mode_is_chunked_too():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, mode="observe")
    sparse, _ = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    numel, shape, op = largest_tensor(sparse, tokens)
    assert numel < SEQ * SEQ, f"{op} created a tensor of shape {shape}"


def test_attribution_backward_creates_no_quadratic_tensor():
    """Forward and backward of attribution patching and block attribution (heads, spans, gates)."""
    from sparse_lens.analysis.attribution_patching import attribution_patching
    from sparse_lens.analysis.interventions import block_attribution

    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, keep_qk=False)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    corrupted = tokens.flip(-1)

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 8]

    def attribution(model, gates):
        return attribution_patching(model, tokens, corrupted, metric, positions=[-1], spans=64, gates=gates)

    for run in (lambda: attribution(sparse, True), lambda: block_attribution(sparse, tokens, metric, positions=[-1])):
        with LargestTensor() as recorder:
            run()
        numel, shape, op = recorder.largest
        assert numel < SEQ * SEQ, f"{op} created a tensor of shape {shape}"
        assert recorder.largest_backward_op > 0  # backward ops ran inside the scan
    # The scan catches a quadratic backward: the dense bridge's softmax gradient is [head, T, T].
    with LargestTensor() as recorder:
        attribution(dense, False)
    assert recorder.largest_backward_op >= SEQ * SEQ


def test_a_model_with_sliding_layers_builds_no_quadratic_mask():
    """Tiny Gemma 3 (layer 0 sliding, window 64; layer 1 global) at 1024 tokens, past the window:
    HF builds its masks through the "flash_attention_2" mask function (set by from_hf_model), which
    makes no [batch, 1, T, T] tensor (with "sdpa" a sliding layer's mask is one once T >= window)."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=64, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"])
    model = sl.HookedSparseTransformer.from_config(config, stream=sl.TracingConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 101, (1, SEQ), generator=torch.Generator().manual_seed(0))
    numel, shape, op = largest_tensor(model, tokens)
    assert numel < SEQ * SEQ, f"{op} created a tensor of shape {shape}"
    # the scan catches HF's sliding-window mask under "sdpa" (so this test can fail)
    model.original_model.config._attn_implementation = "sdpa"
    numel, shape, op = largest_tensor(model, tokens)
    assert numel >= SEQ * SEQ


def test_wrapping_leaves_a_shared_hf_config_usable():
    """The attention setting that avoids HF's T x T masks goes on the wrapped model's own config:
    a second HF model built from the same config object (no flash-attn installed) still builds."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    before = config._attn_implementation  # what HF chose when it built the model ("sdpa")
    model = sl.HookedSparseTransformer.from_hf_model(hf_model)
    assert config._attn_implementation == before
    assert model.original_model.config._attn_implementation == "flash_attention_2"
    assert not any(getattr(m, "config", None) is config for m in model.original_model.modules())
    AutoModelForCausalLM.from_config(config)
