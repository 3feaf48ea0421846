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
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.utilities.multi_gpu import count_unique_devices, find_embedding_device

from sparse_lens.config import TracingConfig
from sparse_lens.errors import InvalidConfigError, PaddingNotSupportedError, ShapeError, UnsupportedModelError
from sparse_lens.kernels.checks import is_int_at_least
from sparse_lens.tl.attention import SparseAttentionBridge
from sparse_lens.tl.checkpointing import RecomputeState, checkpoint_blocks, recompute_state
from sparse_lens.tl.chunking import set_mlp_chunking, set_norm_chunking
from sparse_lens.tl.generation import greedy_generate
from sparse_lens.tl.joint_qkv_attention import SparseJointQKVAttentionBridge
from sparse_lens.tl.loading import DEFAULT_MODEL, check_supported, load_hf_model, resolve_model_source
from sparse_lens.tl.placement import DeviceMap, build_on_devices, dispatch_layers, resolve_placement, targets_cuda


class HookedSparseTransformer(TransformerBridge):
    """A TransformerBridge whose attention layers run (or observe) Stream block-sparse attention."""

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str = DEFAULT_MODEL,
        stream: TracingConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        device_map: DeviceMap | None = None,
        n_devices: int | None = None,
        max_memory: dict[str | int, str | int] | None = None,
    ) -> "HookedSparseTransformer":
        """Load a supported model (package GGUF, local GGUF, local directory or hub id).

        ``device`` puts it on one device; ``device_map`` (``"auto"``, ``"balanced"``, a dict of
        module names to devices), ``n_devices`` and ``max_memory`` spread its layers over several
        as HF's ``from_pretrained`` and TransformerLens' ``boot_transformers`` take them
        (:mod:`sparse_lens.tl.placement`).
        """
        placement, max_memory = resolve_placement(device, device_map, n_devices, max_memory)
        source = resolve_model_source(model_name)
        hf_model, tokenizer = load_hf_model(source, dtype=dtype, device=device, device_map=placement,
                                            max_memory=max_memory)
        return cls.from_hf_model(hf_model, tokenizer, stream, model_name=str(model_name))

    @classmethod
    def from_config(
        cls,
        hf_config: Any,
        stream: TracingConfig | None = None,
        *,
        seed: int = 0,
        tokenizer: Any = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        device_map: DeviceMap | None = None,
        n_devices: int | None = None,
        max_memory: dict[str | int, str | int] | None = None,
    ) -> "HookedSparseTransformer":
        """A random-init model from a HF config (e.g. a tiny ``LlamaConfig``), for tests and
        benchmarks. Offline; parameters are created directly on ``device`` (default ``"cpu"``).
        With ``device_map`` / ``n_devices`` over CPU targets the model is built on the CPU (the same
        weights as with ``device``, for one seed) and its layers then placed by accelerate
        (:func:`~sparse_lens.tl.placement.dispatch_layers`). A map with GPU targets builds every
        module straight on its GPU (:func:`~sparse_lens.tl.placement.build_on_devices`; a 32B shape
        in seconds instead of minutes): the same seed then gives the same weights for any split
        over GPUs, ``device_map={"": 0}`` included, but not the weights of a CPU build."""
        from transformers import AutoModelForCausalLM

        placement, max_memory = resolve_placement(device, device_map, n_devices, max_memory)
        if placement is not None and targets_cuda(placement):
            hf_model = build_on_devices(lambda: AutoModelForCausalLM.from_config(hf_config, dtype=dtype),
                                        placement, max_memory, seed)
        else:
            with torch.random.fork_rng(devices=[]), torch.device("cpu" if placement is not None else device or "cpu"):
                torch.manual_seed(seed)
                hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            if placement is not None:
                dispatch_layers(hf_model, placement, max_memory)
        hf_model.config.architectures = [type(hf_model).__name__]
        return cls.from_hf_model(hf_model.eval(), tokenizer, stream, model_name=f"random-{hf_config.model_type}")

    @classmethod
    def from_hf_model(
        cls,
        hf_model: Any,
        tokenizer: Any = None,
        stream: TracingConfig | None = None,
        *,
        model_name: str = "external",
    ) -> "HookedSparseTransformer":
        """Wrap a loaded HF causal LM (modified in place: bridge components replace its modules).

        Built through TransformerLens' public seam, ``build_bridge_from_module``: its
        ``post_adapter_hook`` swaps each block's attention template for a
        :class:`~sparse_lens.tl.attention.SparseAttentionBridge` before the adapter wraps the HF
        modules. That function always returns a plain ``TransformerBridge``; the result is
        re-classed to ``cls``, which is safe because HookedSparseTransformer adds methods and
        properties only (no ``__init__``, no slots), so the object is exactly what ``cls(...)``
        with the same adapter, tokenizer and driver would have built.
        """
        architecture = check_supported(hf_model)
        model = build_bridge_from_module(
            hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer, model_name=model_name,
            post_adapter_hook=_install_sparse_attention,
            device=find_embedding_device(hf_model),  # layers across devices: inputs go where the embedding is
        )
        model.cfg.n_devices = count_unique_devices(hf_model)
        model.__class__ = cls
        # The bridge forces HF eager attention, whose decoder builds a [B, 1, T, T] mask (so does
        # "sdpa" for sliding-window layers once T reaches the window: five per forward, ~1 GiB
        # each at 32k). HF's mask function for "flash_attention_2" builds no T x T tensor: None for
        # unpadded input, else the 2-D padding mask (which our attention refuses). Our attention
        # never calls HF's attention function, so the flash-attn package is not needed.
        # The setting goes on a config of this model's own: a config object shared with other HF
        # models (e.g. several built from one config) would make their construction fail
        # without flash-attn installed.
        _own_config(hf_model)._attn_implementation = "flash_attention_2"
        model.stream = stream or TracingConfig()
        return model

    # ----- the sparse configuration ---------------------------------------------------------
    @property
    def stream(self) -> TracingConfig:
        """The TracingConfig every attention layer uses. Assign a new one to change it."""
        return self._stream_config

    @stream.setter
    def stream(self, config: TracingConfig) -> None:
        if not isinstance(config, TracingConfig):
            raise InvalidConfigError(f"stream must be a TracingConfig, got {type(config).__name__}.")
        for attention in self.sparse_attention_layers():
            attention.stream = config
        self._stream_config = config

    @contextlib.contextmanager
    def stream_settings(self, **changes: Any) -> Iterator[TracingConfig]:
        """Temporarily change TracingConfig fields: ``with model.stream_settings(mode="observe"): ...``."""
        previous = self.stream
        self.stream = previous.replace(**changes)
        try:
            yield self.stream
        finally:
            self.stream = previous

    @property
    def mlp_chunk_tokens(self) -> int | None:
        """Positions each MLP and each norm (in forwards without gradients) processes at a time
        (``None``: the whole sequence). Results do not change (the fused layers of chunked forwards,
        ``tl.fused_layers``, equal HF's bit for bit, on CUDA too, except a norm in float32 or with a
        weight of another dtype on CUDA: ``torch.rms_norm`` may move a rare element by one unit in
        the last place); set it (e.g. to 65536) for very long inputs, whose MLP and float32 norm
        intermediates are large (``sparse_lens.tl.chunking``)."""
        return getattr(self, "_mlp_chunk_tokens", None)

    @mlp_chunk_tokens.setter
    def mlp_chunk_tokens(self, chunk_tokens: int | None) -> None:
        set_mlp_chunking(self.blocks, chunk_tokens, recompute_state(self))
        set_norm_chunking(self, chunk_tokens)
        self._mlp_chunk_tokens = chunk_tokens

    def lean_backward(
        self, offload: bool = False, segment_layers: int | str | None = "sqrt"
    ) -> contextlib.AbstractContextManager[RecomputeState]:
        """Activation checkpointing while the context is open (``with model.lean_backward():``): the
        forward keeps the input of every ``segment_layers``-th block (default ``ceil(sqrt(n_layers))``;
        None: every block's), the backward recomputes a segment, then each of its blocks, instead of
        keeping their intermediates; norms and MLPs run in sequence chunks. With ``offload=True`` the
        checkpoints wait in host memory. Keep hooks installed across forward and backward
        (``model.hooks(...)``); see ``sparse_lens.tl.checkpointing``."""
        return checkpoint_blocks(self, offload=offload, segment_layers=segment_layers)

    def sparse_attention_layers(self) -> list[SparseAttentionBridge | SparseJointQKVAttentionBridge]:
        """The attention bridge of every block, in layer order."""
        return [block.attn for block in self.blocks]

    # ----- running ----------------------------------------------------------------------------
    def forward(
        self,
        input: Any,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """TransformerBridge's forward (``run_with_cache`` and ``run_with_hooks`` call it too), on
        unpadded input only.

        Padded batches are not supported: the estimator and kernels take no per-row lengths, so
        pad tokens would be attended to and steer block selection. A list of strings whose token
        lengths differ, or an ``attention_mask`` with a zero, raises
        :class:`~sparse_lens.errors.PaddingNotSupportedError`; run such rows one at a time (or
        make them equally long). Token tensors are taken as they are: every position is real.
        """
        _reject_padding(attention_mask)
        if kwargs.get("past_key_values") is None and return_type != "logits_and_cache":
            # HF builds a KV cache by default: every layer's keys and values would stay alive to
            # the end of the forward (16 residual-stream copies for a Llama-3.1-8B shape).
            kwargs.setdefault("use_cache", False)
        if isinstance(input, list) and all(isinstance(item, str) for item in input):
            input = self.unpadded_tokens(input, prepend_bos=prepend_bos)
        elif isinstance(input, Tensor) and kwargs.get("start_at_layer") is None:
            _check_token_ids(input, self.cfg.d_vocab, "the forward")
        return super().forward(
            input, return_type=return_type, loss_per_token=loss_per_token, prepend_bos=prepend_bos,
            padding_side=padding_side, attention_mask=attention_mask, **kwargs,
        )

    def unpadded_tokens(
        self, prompts: str | list[str], *, prepend_bos: bool | None = None, truncate: bool = True
    ) -> Int[Tensor, "batch pos"]:
        """``to_tokens`` for prompts that need no padding: each prompt is tokenized alone (as
        ``to_tokens`` would), and prompts of different token lengths raise
        :class:`~sparse_lens.errors.PaddingNotSupportedError` instead of being padded."""
        rows = [self.to_tokens(prompt, prepend_bos=prepend_bos, truncate=truncate)
                for prompt in ([prompts] if isinstance(prompts, str) else prompts)]
        lengths = [row.shape[-1] for row in rows]
        if len(set(lengths)) > 1:
            raise PaddingNotSupportedError(
                f"These {len(rows)} prompts have different token lengths ({lengths}) and would be padded; "
                "sparse_lens runs unpadded sequences only (pads would be attended to and change the "
                "shorter rows' results). Run the prompts one at a time, or make them equally long."
            )
        return torch.cat(rows)

    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Int[Tensor, "pos"] | Int[Tensor, "batch pos"],
        max_new_tokens: int = 32,
        *,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        prepend_bos: bool | None = None,
        return_type: str = "input",
        attention_mask: Tensor | None = None,
        verbose: bool = False,
        **unsupported: Any,
    ) -> str | list[str] | Int[Tensor, "pos"] | Int[Tensor, "batch pos"]:
        """Greedy decoding: one sparse prefill of the prompt, then KV-cached dense decode steps.

        Accepts what TransformerBridge's ``generate`` accepts, unpadded:

        - a string: returns a string (prompt + continuation, special tokens kept);
        - a list of strings of equal token length: returns a list of strings, one per prompt (a
          list even for one prompt, where TransformerLens returns a bare string); prompts of
          different token lengths raise :class:`~sparse_lens.errors.PaddingNotSupportedError`;
        - token ids ``[pos]`` (one sequence): returns ``[pos + new]`` (the rank is kept);
        - token ids ``[batch, pos]``: returns ``[batch, pos + new]``.

        ``return_type``: ``"input"`` (the above), ``"str"`` (text of every row, a list unless the
        input was a string) or ``"tokens"`` (always ``[batch, pos + new]``). Rows that produce EOS
        stop early and are filled with EOS while the others go on. ``do_sample=True`` and other
        sampling options are not supported (greedy only); an ``attention_mask`` with a zero
        raises ``PaddingNotSupportedError``.
        """
        if do_sample or unsupported:
            names = sorted(unsupported) + (["do_sample=True"] if do_sample else [])
            raise TypeError(f"HookedSparseTransformer.generate does greedy decoding only; unsupported: {names}")
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}.")
        if not is_int_at_least(max_new_tokens, 0):
            raise InvalidConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
        _reject_padding(attention_mask)
        tokens = self._generation_tokens(input, prepend_bos)
        if stop_at_eos and eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        output = greedy_generate(
            self.original_model, tokens.to(self.cfg.device), max_new_tokens,
            eos_token_id=eos_token_id if stop_at_eos else None, verbose=verbose,
        )
        if return_type == "tokens":
            return output
        if return_type == "str" or not isinstance(input, Tensor):
            texts = [self.tokenizer.decode(row, skip_special_tokens=False) for row in output]
            return texts[0] if isinstance(input, str) else texts
        return output[0] if input.ndim == 1 else output

    def _generation_tokens(self, input: Any, prepend_bos: bool | None) -> Int[Tensor, "batch pos"]:
        """The ``[batch, pos]`` prompt tokens of what ``generate`` accepts, else a named error."""
        if isinstance(input, str) or (isinstance(input, list) and input and all(isinstance(p, str) for p in input)):
            return self.unpadded_tokens(input, prepend_bos=prepend_bos, truncate=False)
        if isinstance(input, Tensor):
            _check_token_ids(input, self.cfg.d_vocab, "generate")
            return input if input.ndim == 2 else input[None]
        raise TypeError(
            "generate takes a string, a non-empty list of strings (equal token lengths) or an integer token "
            f"tensor [pos] / [batch, pos]; got {type(input).__name__}."
        )


def _check_token_ids(tokens: Tensor, d_vocab: int, what: str) -> None:
    """ShapeError unless ``tokens`` are integer ids ``[pos]`` or ``[batch, pos]``, pos >= 1, each in
    ``[0, d_vocab)`` (an id outside it failed deep inside the embedding: a bare IndexError on the
    CPU, a device-side assert on CUDA; a 3-d or float tensor failed in the attention's reshape)."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ShapeError(f"{what} takes integer token ids, got a {tokens.dtype} tensor (residual-stream input: "
                         "pass start_at_layer).")
    if tokens.ndim not in (1, 2) or tokens.shape[-1] == 0:
        raise ShapeError(f"{what} takes token ids shaped [pos] or [batch, pos] with pos >= 1, got {tuple(tokens.shape)}.")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        raise ShapeError(f"{what}: token ids must be in [0, d_vocab={d_vocab}), got ids from {low} to {high}.")


def _reject_padding(attention_mask: Tensor | None) -> None:
    """Raise PaddingNotSupportedError for an attention mask that masks out any position."""
    if attention_mask is not None and bool((attention_mask == 0).any()):
        raise PaddingNotSupportedError(
            "The attention mask has padding (zeros); sparse_lens runs unpadded sequences (padding is not "
            "supported: pads would be attended to). Run the rows one at a time, or make them equally long."
        )


# TransformerLens' RoPE attention bridges (by exact class name: a subclass may compute attention
# differently) and the sparse bridge that replaces each.
_SPARSE_BRIDGES = {
    "PositionEmbeddingsAttentionBridge": SparseAttentionBridge,
    "JointQKVPositionEmbeddingsAttentionBridge": SparseJointQKVAttentionBridge,  # fused qkv: Phi-3, GPT-NeoX
}


def _install_sparse_attention(adapter: Any) -> None:
    """Swap the adapter's per-block attention template for its sparse bridge (``_SPARSE_BRIDGES``)."""
    blocks = adapter.component_mapping.get("blocks")
    template = None if blocks is None else blocks.submodules.get("attn")
    sparse_bridge = _SPARSE_BRIDGES.get(type(template).__name__)
    if template is None or sparse_bridge is None:
        raise UnsupportedModelError(
            f"The {type(adapter).__name__} adapter does not use one of TransformerLens' RoPE attention bridges "
            f"({', '.join(_SPARSE_BRIDGES)}; found {type(template).__name__}); sparse_lens cannot replace "
            "its attention."
        )
    blocks.submodules["attn"] = sparse_bridge.replacing(template)


def _own_config(hf_model: Any) -> Any:
    """Give ``hf_model`` (and each of its modules that held the same config object) a copy of its
    config, and return the copy."""
    shared, own = hf_model.config, copy.deepcopy(hf_model.config)
    for module in hf_model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own
    return own

