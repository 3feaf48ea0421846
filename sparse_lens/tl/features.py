"""Which HF attention-module features the sparse attention bridges reproduce, read generically.

Both bridges (:class:`~sparse_lens.tl.attention.SparseAttentionBridge` and
:class:`~sparse_lens.tl.joint_qkv_attention.SparseJointQKVAttentionBridge`) refuse a module that
uses a feature they do not apply, with ``UnsupportedModelError`` naming the feature and the layer.
Detection is by the module's attributes and the bridge config's flags, never by architecture name.
"""

from __future__ import annotations

from typing import Any

# HF attention-module attributes (not None when the feature is on) -> the feature, for messages.
HF_ATTENTION_FEATURES = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "sinks": "learned attention sinks",
    "key_multiplier": "scaled keys",
}
# ... of which the sparse bridges apply these (passed to every kernel call).
APPLIED_HF_FEATURES = ("attn_logit_softcapping", "sinks")
# TransformerLens bridge config flags that route attention through paths the bridges do not implement.
UNSUPPORTED_CONFIG_FLAGS = (
    "use_split_qkv_input", "use_attn_in", "gated_q_proj",
    "rotary_adjacent_pairs", "rotary_interleaved_cos_sin", "qk_norm_after_rope",
)


def unsupported_features(hf_attn: Any, bridge_config: Any) -> list[str]:
    """The features of ``hf_attn`` (an HF attention module) and ``bridge_config`` (the TL bridge
    config) that the sparse bridges do not reproduce, as readable names (empty: none). Checks
    common to both bridges; each adds its own (QK-norm layouts, ``clip_qkv``)."""
    found = [what for attr, what in HF_ATTENTION_FEATURES.items()
             if attr not in APPLIED_HF_FEATURES and getattr(hf_attn, attr, None) is not None]
    found += [flag for flag in UNSUPPORTED_CONFIG_FLAGS if getattr(bridge_config, flag, False)]
    if getattr(hf_attn, "is_causal", True) is False:
        found.append("bidirectional (non-causal) attention")
    return found
