"""Shared fixtures: tiny random models (offline, fast) and the real default model (loaded once)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter; before triton is imported

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, Qwen2Config  # noqa: E402

import sparse_lens as sl  # noqa: E402


def tiny_llama_config(**overrides) -> LlamaConfig:
    """2 layers, 4 query heads sharing 2 KV heads (GQA), head dim 16."""
    settings = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaConfig(**{**settings, **overrides})


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    """Qwen2 has q/k/v biases; 6 query heads sharing 2 KV heads."""
    settings = dict(vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
    return Qwen2Config(**{**settings, **overrides})


def sparse_and_dense(hf_config, stream: sl.StreamConfig, seed: int = 0):
    """A HookedSparseTransformer and a plain dense TransformerBridge with identical weights."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(hf_config).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    dense_hf = copy.deepcopy(hf_model)
    sparse = sl.HookedSparseTransformer.from_hf_model(hf_model, None, stream)
    dense = build_bridge_from_module(dense_hf, dense_hf.config.architectures[0], hf_config=dense_hf.config)
    return sparse, dense


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (SmolLM2-135M-Instruct, dequantised GGUF), loaded once."""
    return sl.HookedSparseTransformer.from_pretrained(sl.DEFAULT_MODEL)
