"""SparseAttentionBridge: TransformerLens' RoPE attention bridge, running on Stream-sparse attention.

It keeps the hook contract of ``PositionEmbeddingsAttentionBridge`` (``hook_q/k/v`` after the
projections, ``hook_rot_q/k`` after RoPE, ``hook_z`` before the output projection,
``hook_result`` when ``cfg.use_attn_result``) and changes what happens between RoPE and
``hook_z``:

- prefill (the whole sequence at once): the configured estimator (``TracingConfig.estimator``)
  picks ``top_k`` key blocks per query block and head; in ``"sparse"`` mode attention runs over
  those blocks only, in ``"observe"`` mode it runs exact dense attention (torch's fused SDPA
  kernels with their log-sum-exp, O(T) memory) and the estimate is recorded beside it; in ``"dense"`` mode it runs plain dense attention (torch SDPA) and nothing is
  estimated or recorded (``hook_pattern`` does not fire);
- ``hook_block_indices`` (before attention), ``hook_block_mass`` (after) and ``hook_pattern`` fire,
  in that order; the last carries a :class:`~sparse_lens.pattern.BlockSparsePattern`, never a
  T x T tensor. An edit through any of them (``pattern.with_block_indices(...)``,
  ``pattern.with_gate(...)``, a changed tensor) is validated and the layer runs on it (sparse
  mode only): see :mod:`sparse_lens.tl.pattern_hooks`;
- ``hook_attn_scores`` never fires: dense pre-softmax scores do not exist on this path. Use
  ``pattern.token_probs()`` (token level, short sequences) or ``pattern.block_mass``;
- decoding with a KV cache (``generate``): the new queries attend densely to every cached key,
  O(T) per token. Prefill is sparse, decode is dense, as in sparse-prefill methods; decode
  steps fire no ``hook_pattern``;
- the layer's sliding window, logit soft-cap and learned sinks (gpt-oss), read from the HF module
  (:mod:`sparse_lens.tl.windows`; ``sinks``), go to every kernel call, prefill and decode, in
  every mode. A layer whose window binds (more keys than the window) keeps its whole window band
  and runs no estimator (exact; the estimator runs on the global layers only), whether or not the
  band fits ``top_k``; a window that does not bind is no window: see
  :mod:`sparse_lens.tl.windows` (``binding_window``). Scores are scaled by the module's ``scaling`` (Gemma's
  ``query_pre_attn_scalar ** -0.5``), QK-norm runs before RoPE, and each layer takes the
  ``position_embeddings`` its HF decoder layer passes (Gemma 3: local layers their own RoPE base).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)
from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sparse_lens.config import TracingConfig
from sparse_lens.errors import (
    ContextTooLongError,
    InvalidConfigError,
    UnsupportedModelError,
)
from sparse_lens.kernels import (
    block_sparse_attention,
    dense_attention,
    dense_attention_bytes,
    estimate_blocks,
    kept_block_mass,
)
from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.rotary_triton import SUPPORTED_DTYPES as ROTARY_KERNEL_DTYPES
from sparse_lens.kernels.rotary_triton import rotary_triton
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl import memory
from sparse_lens.tl.checkpointing import STATE_ATTRIBUTE_OF_ATTENTION, remembered_selection
from sparse_lens.tl.features import unsupported_features
from sparse_lens.tl.pattern_hooks import fire_block_indices, fire_block_mass, fire_pattern
from sparse_lens.tl.windows import (
    attention_softcap,
    binding_window,
    check_one_sequence,
    sliding_window,
    window_selection,
)

# Positions rotated at a time in forwards without gradients (apply_rotary): the in-place rotation's
# one temporary holds half of 32,768 positions instead of HF's formula's three whole-sequence
# temporaries (q * cos, rotate_half(q), its product with sin: three residual-stream copies for
# Llama-3.1-8B's queries).
ROTARY_CHUNK_TOKENS = 32_768


def init_sparse_state(bridge: Any) -> None:
    """The state every sparse attention bridge adds to its TransformerLens base (this module's
    bridge and the fused-qkv one): the configuration, the pattern hook without tensor conversion,
    the block hooks, and the layer's window and soft-cap (set from the HF module in
    ``set_original_component``, :mod:`sparse_lens.tl.windows`)."""
    bridge.stream = TracingConfig()
    bridge.hook_pattern.hook_conversion = None  # the pattern is not a tensor to reshape
    # Tensor hooks beside hook_pattern (as TL's DSA bridge's hook_topk_indices); order and edit
    # semantics in sparse_lens.tl.pattern_hooks.
    bridge.hook_block_indices = HookPoint()
    bridge.hook_block_mass = HookPoint()
    bridge._sliding_window = None  # tokens; query i sees key j iff i - window < j <= i
    bridge._softcap = None  # scores s -> softcap * tanh(s / softcap)


class SparseAttentionBridge(PositionEmbeddingsAttentionBridge):
    """RoPE self-attention whose pattern is estimated and applied block-sparsely."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        init_sparse_state(self)

    @classmethod
    def replacing(cls, template: PositionEmbeddingsAttentionBridge) -> "SparseAttentionBridge":
        """A sparse bridge with the same HF name, config and q/k/v/o submodules as ``template``."""
        return cls(
            name=template.name,
            config=template.config,
            submodules=template.submodules,
            optional=getattr(template, "optional", False),
        )

    def set_original_component(self, component: torch.nn.Module) -> None:
        super().set_original_component(component)
        unsupported = unsupported_features(component, self.config)
        if getattr(getattr(component, "config", None), "clip_qkv", None) is not None:
            unsupported.append("clipped q/k/v (clip_qkv)")
        if self._qk_norm_per_head:
            unsupported.append("QK-norm with [n_heads, d_head] weights")
        self._sliding_window = sliding_window(component)
        self._softcap = attention_softcap(component)
        if unsupported:
            raise UnsupportedModelError(
                f"{type(component).__name__} at {self._where()} uses {', '.join(unsupported)}, which "
                "sparse_lens' attention does not reproduce."
            )

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        hf_attn: Any = self.original_component
        hidden_states = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.pop("position_embeddings", None)
        attention_mask = kwargs.pop("attention_mask", None)

        hidden_states = self.hook_in(hidden_states)
        batch, n_new = hidden_states.shape[:2]
        head_dim = hf_attn.head_dim
        split_heads = "batch pos (head d_head) -> batch head pos d_head"
        query, key, value = self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)
        if self._qk_norm_phase == "pre_reshape":  # OLMo-2: RMS norm over the whole projection
            query = self.hook_q_normed(self.q_norm(query))
            if "k_norm" in self.submodules:
                key = self.hook_k_normed(self.k_norm(key))
        query: Float[Tensor, "batch q_head pos d_head"] = rearrange(query, split_heads, d_head=head_dim)
        key: Float[Tensor, "batch kv_head pos d_head"] = rearrange(key, split_heads, d_head=head_dim)
        value: Float[Tensor, "batch kv_head pos d_head"] = rearrange(value, split_heads, d_head=head_dim)
        if self._qk_norm_phase == "post_reshape":  # Qwen3 / Gemma 3: norm over each head's d_head
            query, key = self._post_reshape_qk_norm(query, key)

        if position_embeddings is None:
            raise UnsupportedModelError(f"{self.name}: no rotary position embeddings were passed to attention.")
        cos, sin = self._apply_position_embedding_hooks(position_embeddings)
        query, key = apply_rotary(query, key, cos, sin, full_rotary=get_rotary_pct_from_config(self.config) == 1.0,
                                  chunk_tokens=ROTARY_CHUNK_TOKENS)
        query = _llama_4_query_scale(hf_attn, query, kwargs.get("position_ids"))
        query = self.hook_rot_q(query)
        key = self.hook_rot_k(key)
        key, value = self._update_kv_cache(key, value, **kwargs)
        # Short inputs' rotary outputs (and the values) are strided views of [batch, pos, heads * d_head]
        # buffers, which each kernel would copy to contiguous again: one copy here, and the strided
        # buffers are freed before the estimator and attention run. Long inputs are rotated into
        # contiguous buffers already (apply_rotary's chunks): no copy.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()

        scale = float(getattr(hf_attn, "scaling", head_dim**-0.5))
        n_cached = key.shape[2] - n_new
        # sinks: per-head logits in the softmax normaliser (gpt-oss), read live (a Parameter); a
        # window that hides no key is none (the estimator runs), as in the fused-qkv bridge
        features = {"window": binding_window(self._sliding_window, key.shape[2]), "softcap": self._softcap,
                    "sinks": getattr(hf_attn, "sinks", None)}
        if n_cached == 0:
            check_one_sequence(attention_mask, kwargs.get("position_ids"), features["window"])
            z = self._prefill(query, key, value, scale, **features)
        else:  # HF's cache may hold only a windowed layer's last keys; the window then hides none of them
            z, _ = dense_attention(query, key, value, scale=scale, query_offset=n_cached, **features)

        del query, key, value  # not alive during the output projection (1.5 residual copies for Llama-3.1-8B)
        z = rearrange(z, "batch head pos d_head -> batch pos (head d_head)")
        return self._project_output(z, batch, n_new, head_dim), None

    def _prefill(
        self,
        query: Float[Tensor, "batch q_head seq d_head"],
        key: Float[Tensor, "batch kv_head seq d_head"],
        value: Float[Tensor, "batch kv_head seq d_head"],
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        sinks: Float[Tensor, "q_head"] | None = None,
    ) -> Float[Tensor, "batch q_head seq d_head"]:
        """Prefill attention in ``self.stream``'s mode, firing the block hooks (module docstring).
        ``window`` (tokens) / ``softcap`` / ``sinks``: the layer's sliding window, logit soft-cap and
        per-head sink logits (in the softmax normaliser only; gpt-oss), applied by every kernel; a
        windowed layer keeps its whole window band instead of an estimate
        (:func:`~sparse_lens.tl.windows.window_selection`). Pass ``window`` only where it binds
        (:func:`~sparse_lens.tl.windows.binding_window`)."""
        seq_len = query.shape[2]
        cfg = top_k_within_key_blocks(self.stream, seq_len)  # no slots beyond the key blocks there are
        geometry = {"query_block": cfg.query_block, "key_block": cfg.key_block}
        features = {"window": window, "softcap": softcap, "sinks": sinks}
        if cfg.mode == "observe":
            _check_observe_fits(query, key, value, scale, cfg)
        if cfg.mode == "dense":
            if any(feature is not None for feature in features.values()):  # SDPA's is_causal applies none
                return dense_attention(query, key, value, scale=scale, backend=cfg.backend, **features)[0]
            return F.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
            )
        if window is not None:
            block_indices = window_selection(seq_len, batch=query.shape[0], heads=query.shape[1], top_k=cfg.top_k,
                                             window=window, device=query.device, **geometry)
        else:
            with torch.no_grad():  # a checkpointed block's recomputation reuses its first pass's selection
                block_indices = remembered_selection(
                    self.__dict__.get(STATE_ATTRIBUTE_OF_ATTENTION), self,
                    lambda: estimate_blocks(query, key, scale=scale, **cfg.estimator_kwargs()))
        hook_geometry = {"seq_len": seq_len, "mode": cfg.mode, "layer": self.name, **geometry}
        block_indices = fire_block_indices(self.hook_block_indices, block_indices, **hook_geometry)
        if cfg.mode == "sparse":
            z, lse, block_mass = block_sparse_attention(
                query, key, value, block_indices, scale=scale, backend=cfg.backend, **geometry, **features
            )
        else:
            z, lse = dense_attention(query, key, value, scale=scale, backend=cfg.backend, **features)
            with torch.no_grad():
                block_mass = kept_block_mass(query, key, block_indices, lse, scale=scale, backend=cfg.backend,
                                             **geometry, **features)
        block_gate = fire_block_mass(self.hook_block_mass, block_mass, mode=cfg.mode, layer=self.name)
        if block_gate is not None:
            z, _, _ = block_sparse_attention(
                query, key, value, block_indices, scale=scale, block_gate=block_gate, backend=cfg.backend, **geometry,
                **features,
            )
        pattern = BlockSparsePattern(
            block_indices=block_indices,
            block_mass=block_mass,
            lse=lse,
            seq_len=seq_len,
            scale=scale,
            mode=cfg.mode,
            query=query if cfg.keep_qk else None,
            key=key if cfg.keep_qk else None,
            block_gate=block_gate,
            **geometry,
            **features,
        )
        hooked = fire_pattern(self.hook_pattern, pattern, layer=self.name)
        if hooked is None:
            return z
        z, _, _ = block_sparse_attention(
            query, key, value, hooked.block_indices, scale=scale, block_gate=hooked.block_gate,
            backend=cfg.backend, **geometry, **features,
        )
        return z

    def _post_reshape_qk_norm(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """TL's post-reshape QK-norm on ``[batch, head, pos, d_head]`` (weight ``[d_head]`` or none;
        StableLM's per-head norm list), firing ``hook_q_normed``/``hook_k_normed`` as TL does."""
        query = self.hook_q_normed(self.q_norm(query))
        if "k_norm" in self.submodules:
            key = self.hook_k_normed(self.k_norm(key))
        return query, key

    def _where(self) -> str:
        """This layer for messages: ``blocks.{layer}.attn`` and the HF module name."""
        return f"blocks.{self._layer_idx}.attn ({self.name}, layer {self._layer_idx})"

    def _update_kv_cache(self, key: Tensor, value: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append to HF's KV cache when one is passed (``cache=`` since transformers 5.24, else
        ``past_key_values=``) and return the keys and values of every position so far."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return key, value
        return cache.update(key, value, self._layer_idx)

    def _project_output(self, z: Tensor, batch: int, n_new: int, head_dim: int) -> Tensor:
        """``hook_z`` -> output projection -> ``hook_out`` (per-head ``hook_result`` if enabled)."""
        o_weight = self.o.original_component.weight
        z = z.to(o_weight.dtype)
        if getattr(self.config, "use_attn_result", False):
            n_heads = int(self.config.n_heads)
            z = self.o.hook_in(z)
            result = self._compute_per_head_result(z.view(batch, n_new, n_heads, head_dim), n_heads, head_dim)
            return self.hook_out(result)
        return self.hook_out(self.o(z))


def apply_rotary(
    query: Float[Tensor, "batch q_head pos d_head"],
    key: Float[Tensor, "batch kv_head pos d_head"],
    cos: Float[Tensor, "batch pos rotary_dim"],
    sin: Float[Tensor, "batch pos rotary_dim"],
    *,
    full_rotary: bool = True,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """RoPE as TL's PositionEmbeddingsAttentionBridge applies it: HF's rotate-half formula over the
    first ``rotary_dim = cos.shape[-1]`` dims of each head, the rest passed through (partial rotary:
    GPT-NeoX, Phi, ``partial_rotary_factor < 1``). ``full_rotary`` (the config's rotary fraction is
    1) with half-width ``cos``/``sin`` is GPT-OSS' un-duplicated convention: the halves are repeated.

    ``chunk_tokens``: without gradients, on sequences longer than that, rotate into contiguous
    ``[batch, head, pos, d_head]`` outputs: on CUDA in bf16 by the one-pass Triton kernel
    (``kernels.rotary_triton``), else ``chunk_tokens`` positions at a time, in place
    (``_rotate_into``: one chunk-sized temporary, half the passes of HF's formula); the same
    values as HF's formula, bit for bit."""
    rotary_dim, head_dim = cos.shape[-1], query.shape[-1]
    if full_rotary and rotary_dim * 2 == head_dim:
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    seq_len = query.shape[-2]
    with_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    same_dtype = cos.dtype == sin.dtype == query.dtype == key.dtype  # else HF's formula promotes
    if chunk_tokens is None or seq_len <= chunk_tokens or with_grad or not same_dtype:
        return _rotate(query, key, cos, sin)
    if _rotary_on_kernel(query, key, cos):  # one pass, no chunks needed (no temporaries)
        return rotary_triton(query, cos, sin), rotary_triton(key, cos, sin)
    outputs = (query.new_empty(query.shape), key.new_empty(key.shape))
    for start in range(0, seq_len, chunk_tokens):
        positions = slice(start, start + chunk_tokens)
        cos_chunk, sin_chunk = cos[:, None, positions, :], sin[:, None, positions, :]
        for source, output in zip((query, key), outputs):
            _rotate_into(output[..., positions, :], source[..., positions, :], cos_chunk, sin_chunk)
    return outputs


def _rotary_on_kernel(query: Tensor, key: Tensor, cos: Tensor) -> bool:
    """Whether the one-pass RoPE kernel (``kernels.rotary_triton``) takes these inputs: CUDA bf16
    tensors (the caller checked that ``cos`` / ``sin`` share the dtype), unit last strides, an even
    ``rotary_dim``."""
    return (query.is_cuda and query.dtype in ROTARY_KERNEL_DTYPES and query.stride(-1) == 1 == key.stride(-1)
            and cos.dim() == 3 and cos.shape[-1] % 2 == 0)


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """``out = x * cos + rotate_half(x) * sin`` over the first ``cos.shape[-1]`` dims (the rest
    copied), rounded as HF's formula rounds it: per half, ``x1 * c1 - x2 * s1`` and ``x2 * c2 + x1 *
    s2``, each product rounded to the dtype before the sum (``rotate_half`` only negates, exactly)."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    out1, out2 = out[..., :half], out[..., half:rotary_dim]
    torch.mul(x1, cos[..., :half], out=out1)
    scratch = x2 * sin[..., :half]
    out1.sub_(scratch)
    torch.mul(x2, cos[..., half:], out=out2)
    torch.mul(x1, sin[..., half:], out=scratch)
    out2.add_(scratch)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]


def _rotate(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`apply_rotary`'s formula on whole tensors (``cos``/``sin`` already full width)."""
    rotary_dim, head_dim = cos.shape[-1], query.shape[-1]
    if rotary_dim < head_dim:
        q_rot, k_rot = apply_rotary_pos_emb(query[..., :rotary_dim], key[..., :rotary_dim], cos, sin)
        return torch.cat([q_rot, query[..., rotary_dim:]], dim=-1), torch.cat([k_rot, key[..., rotary_dim:]], dim=-1)
    return apply_rotary_pos_emb(query, key, cos, sin)


def _llama_4_query_scale(hf_attn: Any, query: Tensor, position_ids: Tensor | None) -> Tensor:
    """Ministral 3's positional query scale after RoPE, ``1 + beta * log(1 + floor(pos / original_max))``
    (HF's ``get_llama_4_attn_scale``), when the HF config sets ``llama_4_scaling_beta``."""
    rope = getattr(getattr(hf_attn, "config", None), "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("llama_4_scaling_beta") is None:
        return query
    if position_ids is None:
        position_ids = torch.arange(query.shape[-2], device=query.device)[None]
    beta, original_max = float(rope["llama_4_scaling_beta"]), int(rope["original_max_position_embeddings"])
    scale = 1 + beta * torch.log(1 + torch.floor(position_ids / original_max))
    return query * scale[:, None, :, None].to(query.dtype)


def top_k_within_key_blocks(stream: TracingConfig, seq_len: int) -> TracingConfig:
    """``stream`` with ``top_k`` lowered to the ``ceil(seq_len / key_block)`` key blocks of a
    ``seq_len``-token prefill where it is more; else ``stream`` itself.

    The kept blocks do not change: every estimator, and causal (lagged) selection, keeps all the
    visible blocks of a query block that sees at most ``top_k`` of them, and no query block sees
    more than the sequence's key blocks, so under either budget every row keeps all it sees. Only
    the ``-1`` slots past them go (each one costs estimator and attention work and pattern memory:
    ``top_k=1000`` on 31 key blocks did 30-45x the work), so ``block_indices`` / ``block_mass``
    are ``[..., min(top_k, n_key_blocks)]`` wide. The adaptive estimator's ``top_k`` stays above
    its ``min_blocks`` (at ``min_blocks`` its settings warn that ``top_p`` has no effect, true of
    the lowered config only). A config the lower ``top_k`` would make invalid (e.g.
    ``sink_blocks + local_blocks`` above it) is kept as is.
    """
    fewest_kept = getattr(stream.estimator_settings, "min_blocks", 0)  # "adaptive": its floor
    lowered = max(num_blocks(seq_len, stream.key_block), fewest_kept + 1)
    if stream.top_k <= lowered:
        return stream
    try:
        return stream.replace(top_k=lowered)
    except InvalidConfigError:
        return stream


def _check_observe_fits(query: Tensor, key: Tensor, value: Tensor, scale: float, cfg: TracingConfig) -> None:
    """Raise ``ContextTooLongError`` when observe mode's dense attention would not fit: past
    ``cfg.observe_max_tokens`` (if set), or when its estimated memory exceeds what is free."""
    seq_len = query.shape[2]
    if cfg.observe_max_tokens is not None and seq_len > cfg.observe_max_tokens:
        raise ContextTooLongError(
            f"mode='observe' is capped at observe_max_tokens={cfg.observe_max_tokens}; got {seq_len} tokens. "
            "Set observe_max_tokens=None (limited by memory only) or use mode='sparse'."
        )
    needed = dense_attention_bytes(query, key, value, scale=scale, backend=cfg.backend)
    free = memory.free_bytes(query.device)
    if needed > free:
        raise ContextTooLongError(
            f"mode='observe' at {seq_len} tokens: dense attention needs about {needed / 2**30:.2f} GiB per layer "
            f"(output, lse, scratch) and {free / 2**30:.2f} GiB is free on {query.device}. Use mode='sparse', "
            "a shorter input or a larger device."
        )
