"""Compute kernels of sparse_lens: the Stream estimator and block-sparse / dense attention.

Nothing here imports TransformerLens. Every function takes [batch, heads, seq, d_head] tensors
(keys and values may have fewer heads than queries: GQA) and returns plain tensors.
The torch references in ``*_ref.py`` are the readable definitions and the test oracles.
"""

from sparse_lens.kernels.dense_ref import dense_attention, dense_block_mass
from sparse_lens.kernels.estimator_ref import stream_estimate
from sparse_lens.kernels.sparse_attention_ref import (
    block_sparse_attention,
    kept_block_mass,
    kept_token_probs,
)

__all__ = [
    "block_sparse_attention",
    "dense_attention",
    "dense_block_mass",
    "kept_block_mass",
    "kept_token_probs",
    "stream_estimate",
]
