"""HookedSparseTransformer: a TransformerLens 4.x ``TransformerBridge`` on Stream-sparse attention.

Everything a TransformerBridge does works (``run_with_cache``, ``run_with_hooks``, ``to_tokens``,
legacy hook names, ``transformer_lens.patching``), with two differences:
``blocks.{l}.attn.hook_pattern`` carries a :class:`~sparse_lens.pattern.BlockSparsePattern`,
and no T x T tensor is built anywhere in the forward pass (HF's eager mask is switched off).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources._bridge_builder import (
    build_bridge_config_from_hf,
    configure_tokenizer,
)
from transformer_lens.model_bridge.sources.transformers_driver import TransformersDriver

from sparse_lens.config import StreamConfig
from sparse_lens.errors import InvalidConfigError, PaddingNotSupportedError, UnsupportedModelError
from sparse_lens.tl.attention import SparseAttentionBridge
from sparse_lens.tl.chunking import set_mlp_chunking
from sparse_lens.tl.generation import greedy_generate
from sparse_lens.tl.loading import DEFAULT_MODEL, check_supported, load_hf_model, resolve_model_source


class HookedSparseTransformer(TransformerBridge):
    """A TransformerBridge whose attention layers run (or observe) Stream block-sparse attention."""

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str = DEFAULT_MODEL,
        stream: StreamConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> "HookedSparseTransformer":
        """Load a supported model (package GGUF, local GGUF, local directory or hub id)."""
        source = resolve_model_source(model_name)
        hf_model, tokenizer = load_hf_model(source, dtype=dtype, device=device)
        return cls.from_hf_model(hf_model, tokenizer, stream, model_name=str(model_name))

    @classmethod
    def from_config(
        cls,
        hf_config: Any,
        stream: StreamConfig | None = None,
        *,
        seed: int = 0,
        tokenizer: Any = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "HookedSparseTransformer":
        """A random-init model from a HF config (e.g. a tiny ``LlamaConfig``), for tests and
        benchmarks. Offline; parameters are created directly on ``device``."""
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        hf_model.config.architectures = [type(hf_model).__name__]
        return cls.from_hf_model(hf_model.eval(), tokenizer, stream, model_name=f"random-{hf_config.model_type}")

    @classmethod
    def from_hf_model(
        cls,
        hf_model: Any,
        tokenizer: Any = None,
        stream: StreamConfig | None = None,
        *,
        model_name: str = "external",
    ) -> "HookedSparseTransformer":
        """Wrap a loaded HF causal LM (modified in place: bridge components replace its modules)."""
        architecture = check_supported(hf_model)
        bridge_config = build_bridge_config_from_hf(
            hf_model.config, architecture, model_name, next(hf_model.parameters()).dtype
        )
        adapter = ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)
        _install_sparse_attention(adapter)
        adapter.cfg.device = str(next(hf_model.parameters()).device)
        adapter.prepare_model(hf_model)
        if tokenizer is not None:
            tokenizer = configure_tokenizer(tokenizer, adapter.cfg)
        model = cls(hf_model, adapter, tokenizer, driver=TransformersDriver(hf_model, adapter, tokenizer))
        # The bridge forces HF eager attention, whose decoder builds a [B, 1, T, T] mask. With
        # "sdpa" HF passes attention_mask=None for unpadded input; our attention ignores the
        # setting itself (it never calls HF's attention function).
        hf_model.config._attn_implementation = "sdpa"
        model.stream = stream or StreamConfig()
        return model

    # ----- the sparse configuration ---------------------------------------------------------
    @property
    def stream(self) -> StreamConfig:
        """The StreamConfig every attention layer uses. Assign a new one to change it."""
        return self._stream_config

    @stream.setter
    def stream(self, config: StreamConfig) -> None:
        if not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"stream must be a StreamConfig, got {type(config).__name__}.")
        for attention in self.sparse_attention_layers():
            attention.stream = config
        self._stream_config = config

    @contextlib.contextmanager
    def stream_settings(self, **changes: Any) -> Iterator[StreamConfig]:
        """Temporarily change StreamConfig fields: ``with model.stream_settings(mode="observe"): ...``."""
        previous = self.stream
        self.stream = previous.replace(**changes)
        try:
            yield self.stream
        finally:
            self.stream = previous

    @property
    def mlp_chunk_tokens(self) -> int | None:
        """Positions each MLP processes at a time (``None``: the whole sequence). Results do not
        change; set it (e.g. to 65536) for very long inputs, whose MLP intermediates are large."""
        return getattr(self, "_mlp_chunk_tokens", None)

    @mlp_chunk_tokens.setter
    def mlp_chunk_tokens(self, chunk_tokens: int | None) -> None:
        set_mlp_chunking(self.blocks, chunk_tokens)
        self._mlp_chunk_tokens = chunk_tokens

    def sparse_attention_layers(self) -> list[SparseAttentionBridge]:
        """The attention bridge of every block, in layer order."""
        return [block.attn for block in self.blocks]

    # ----- running ----------------------------------------------------------------------------
    def forward(self, input: Any, *args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None and bool((attention_mask == 0).any()):
            raise PaddingNotSupportedError(
                "The attention mask has padding (zeros); sparse_lens runs unpadded sequences. "
                "Run sequences of equal length, or one at a time."
            )
        return super().forward(input, *args, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input: str | Int[Tensor, "batch pos"],
        max_new_tokens: int = 32,
        *,
        stop_at_eos: bool = True,
        verbose: bool = False,
        **unsupported: Any,
    ) -> str | Int[Tensor, "batch pos"]:
        """Greedy decoding: one sparse prefill of the prompt, then KV-cached dense decode steps.

        Returns a string (prompt + continuation) for string input, else the token tensor.
        """
        if unsupported:
            raise TypeError(
                f"HookedSparseTransformer.generate does greedy decoding only; unsupported: {sorted(unsupported)}"
            )
        tokens = self.to_tokens(input) if isinstance(input, str) else input
        eos_token_id = getattr(self.tokenizer, "eos_token_id", None) if stop_at_eos else None
        output = greedy_generate(
            self.original_model, tokens.to(self.cfg.device), max_new_tokens, eos_token_id=eos_token_id, verbose=verbose
        )
        if isinstance(input, str):
            return self.tokenizer.decode(output[0], skip_special_tokens=False)
        return output


def _install_sparse_attention(adapter: Any) -> None:
    """Swap the adapter's per-block attention template for a SparseAttentionBridge."""
    blocks = adapter.component_mapping.get("blocks")
    template = None if blocks is None else blocks.submodules.get("attn")
    if template is None or type(template).__name__ != "PositionEmbeddingsAttentionBridge":
        raise UnsupportedModelError(
            f"The {type(adapter).__name__} adapter does not use TransformerLens' RoPE attention bridge "
            f"(found {type(template).__name__}); sparse_lens cannot replace its attention."
        )
    blocks.submodules["attn"] = SparseAttentionBridge.replacing(template)
