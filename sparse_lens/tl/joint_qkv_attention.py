"""SparseJointQKVAttentionBridge: TransformerLens' fused-qkv RoPE attention bridge on Stream-sparse attention.

Some families project queries, keys and values with one fused linear layer: Phi-3's ``qkv_proj``
(``[q; k; v]`` stacked, GQA) and GPT-NeoX / Pythia's ``query_key_value`` (``[q_h, k_h, v_h]``
interleaved per head). TransformerLens bridges them with
``JointQKVPositionEmbeddingsAttentionBridge``: at load time the architecture adapter's own
``split_qkv_matrix`` cuts the fused weight into three ``nn.Linear`` layers ``q``, ``k``, ``v``, whose
outputs fire ``hook_q`` / ``hook_k`` / ``hook_v``. This subclass keeps that split (it never reads
the layout itself: the adapter knows it) and replaces what happens between ``hook_q/k/v`` and
``hook_z`` with what :class:`~sparse_lens.tl.attention.SparseAttentionBridge` does:

- RoPE from the ``position_embeddings`` the HF layer passes (``hook_cos`` / ``hook_sin``), over the
  first ``rotary_dim = cos.shape[-1]`` dims of each head (partial rotary: Pythia's ``rotary_pct``,
  Phi-3 variants' ``partial_rotary_factor``), then ``hook_rot_q`` / ``hook_rot_k``, which TL's
  dense joint bridge does not fire;
- prefill: SparseAttentionBridge's own ``_prefill`` (the estimator, ``hook_block_indices``,
  ``hook_block_mass``, ``hook_pattern`` with a :class:`~sparse_lens.pattern.BlockSparsePattern`,
  the three modes and edits), shared, not copied, with the layer's attention features read from
  the HF module as there: logit soft-cap, learned sinks, and the sliding window (Phi-3-mini-4k:
  2047 tokens) where it binds, i.e. when there are more keys than the window (the layer then keeps
  its window band, exact: :mod:`sparse_lens.tl.windows`); a window no shorter than the keys hides
  nothing and the estimator runs as without one (Phi-3-mini-128k's 262144);
- decode with HF's KV cache (``cache=``, ``past_key_values=`` or NeoX's ``layer_past=``): dense
  over every cached key, with the same features;
- ``hook_z`` -> output projection (per-head ``hook_result`` when ``cfg.use_attn_result``) ->
  ``hook_out``. ``hook_attn_scores`` never fires, as in SparseAttentionBridge.

Parallel attention and MLP (NeoX's ``use_parallel_residual``) is the block's business: the
adapter picks TL's ``ParallelBlockBridge`` and this layer does not change.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (
    JointQKVPositionEmbeddingsAttentionBridge,
)
from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

from sparse_lens.errors import UnsupportedModelError
from sparse_lens.kernels import dense_attention
from sparse_lens.tl.attention import ROTARY_CHUNK_TOKENS, SparseAttentionBridge, apply_rotary, init_sparse_state
from sparse_lens.tl.features import unsupported_features
from sparse_lens.tl.windows import attention_softcap, binding_window, check_one_sequence, sliding_window

# HF attention submodules of a QK-norm, which TL's joint bridge (and so this one) does not apply.
_QK_NORM_MODULES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


class SparseJointQKVAttentionBridge(JointQKVPositionEmbeddingsAttentionBridge):
    """Fused-qkv RoPE self-attention whose pattern is estimated and applied block-sparsely."""

    # The sparse prefill and the messages about this layer are SparseAttentionBridge's: they read
    # only ``stream``, ``name``, ``_layer_idx`` and the hook points set below.
    _prefill = SparseAttentionBridge._prefill
    _where = SparseAttentionBridge._where

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        init_sparse_state(self)

    @classmethod
    def replacing(cls, template: JointQKVPositionEmbeddingsAttentionBridge) -> "SparseJointQKVAttentionBridge":
        """A sparse bridge with ``template``'s HF name, config, submodules (``qkv``, ``o``), the
        adapter's ``split_qkv_matrix`` and its attention-mask requirement."""
        return cls(
            name=template.name,
            config=template.config,
            split_qkv_matrix=template.split_qkv_matrix,
            submodules=template.submodules,
            requires_attention_mask=template.requires_attention_mask,
        )

    def set_original_component(self, component: torch.nn.Module) -> None:
        """Wrap the HF attention module (the adapter splits its fused projection into ``q/k/v``
        here); ``UnsupportedModelError`` naming the layer for features this bridge does not apply."""
        super().set_original_component(component)
        unsupported = unsupported_features(component, self.config)
        if any(getattr(component, name, None) is not None for name in _QK_NORM_MODULES):
            unsupported.append("QK-norm (not applied by TransformerLens' fused-qkv bridge)")
        self._sliding_window = sliding_window(component)
        self._softcap = attention_softcap(component)
        if unsupported:
            raise UnsupportedModelError(
                f"{type(component).__name__} at {self._where()} uses {', '.join(unsupported)}, which "
                "sparse_lens' attention does not reproduce."
            )

    def _reconstruct_attention(
        self,
        q: Float[Tensor, "batch pos q_width"],
        k: Float[Tensor, "batch pos kv_width"],
        v: Float[Tensor, "batch pos kv_width"],
        **kwargs: Any,
    ) -> tuple[Float[Tensor, "batch pos d_model"], None]:
        """Attention from the split projections' outputs (after ``hook_q/k/v``) to the output
        projection; returns ``(output, None)`` (no dense pattern), which TL's ``forward`` passes
        through ``hook_hidden_states`` and ``hook_out``."""
        hf_attn: Any = self.original_component
        n_heads = int(self.config.n_heads)
        n_kv_heads = int(getattr(self.config, "n_key_value_heads", None) or n_heads)
        query, key, value, batch, n_new, head_dim = self._reshape_qkv_to_heads(q, k, v, n_heads, n_kv_heads)
        query: Float[Tensor, "batch q_head pos d_head"]
        key: Float[Tensor, "batch kv_head pos d_head"]
        value: Float[Tensor, "batch kv_head pos d_head"]

        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise UnsupportedModelError(f"{self._where()}: no rotary position embeddings were passed to attention.")
        cos, sin = self._apply_position_embedding_hooks(position_embeddings)
        query, key = apply_rotary(query, key, cos, sin, full_rotary=get_rotary_pct_from_config(self.config) == 1.0,
                                  chunk_tokens=ROTARY_CHUNK_TOKENS)
        query = self.hook_rot_q(query)
        key = self.hook_rot_k(key)
        key, value = self._update_kv_cache(key, value, **kwargs)
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()

        scale = float(getattr(hf_attn, "scaling", head_dim**-0.5))
        n_cached = key.shape[2] - n_new
        features = {"window": binding_window(self._sliding_window, key.shape[2]), "softcap": self._softcap,
                    "sinks": getattr(hf_attn, "sinks", None)}
        if n_cached == 0:
            check_one_sequence(kwargs.get("attention_mask"), kwargs.get("position_ids"), features["window"])
            z = self._prefill(query, key, value, scale, **features)
        else:
            z, _ = dense_attention(query, key, value, scale=scale, query_offset=n_cached, **features)

        del query, key, value  # not alive during the output projection
        z = rearrange(z, "batch head pos d_head -> batch pos (head d_head)").to(self.o.original_component.weight.dtype)
        if getattr(self.config, "use_attn_result", False):
            z = self.o.hook_in(z)
            return self._compute_per_head_result(z.view(batch, n_new, n_heads, head_dim), n_heads, head_dim), None
        return self.o(z), None

    def _update_kv_cache(self, key: Tensor, value: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append to HF's KV cache when one is passed (``cache=`` since transformers 5.24,
        ``past_key_values=`` before, ``layer_past=`` in GPT-NeoX) and return every position's keys
        and values."""
        for name in ("cache", "past_key_values", "layer_past"):
            if kwargs.get(name) is not None:
                return kwargs[name].update(key, value, self._layer_idx)
        return key, value
