"""Compute kernels of sparse_lens: the Stream estimator and block-sparse / dense attention.

Nothing here imports TransformerLens. Every function takes [batch, heads, seq, d_head] tensors
(keys and values may have fewer heads than queries: GQA) and returns plain tensors.

- torch code, readable, running on any device and the test oracle of the Triton kernels: one
  module per op, named for what it holds (``search.py``: the hierarchical search loop and its
  branch scores; ``stream.py``: the Stream estimator on that loop; ``oneshot.py``: one-shot
  baselines; ``rescore.py``: the rescored and adaptive estimators; ``exact_block_mass.py``: exact
  dense block masses at several block sizes; ``sparse_attention.py``: block-sparse attention;
  ``dense.py``: chunked dense attention with its lse). ``search_ref`` / ``oneshot_ref`` /
  ``rescore_ref`` / ``estimator_ref`` / ``estimator_triton`` / ``sparse_attention_ref`` /
  ``dense_ref`` are deprecated paths (one release) that warn and forward;
- ``*_triton.py``: Triton kernels with the same signatures;
- ``dispatch.py``: ``stream_estimate``, ``block_sparse_attention``, ``dense_attention``,
  ``kept_block_mass`` and ``block_mass_rows`` pick one (``backend=``); dense attention's fast path
  is torch's fused SDPA with its log-sum-exp (``dense_sdpa.py``), block masses under a given lse
  run on ``block_mass_triton.py``;
- ``oracle.py``: ``oracle_blocks``, the exact top-k blocks by dense mass, streamed over query blocks;
- ``registry.py``: every estimator registered once (name, function, its settings dataclass);
  ``estimate.py``: ``estimate_blocks(..., estimator=name)``, any of them behind one call;
- ``causal.py``: ``lagged_selection``, the strictly causal selection wrapped around any estimator
  (``estimate_blocks(..., causal=True)``).
"""

from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.kernels.causal import lagged_selection
from sparse_lens.kernels.dense import dense_block_mass
from sparse_lens.kernels.dispatch import (
    BACKENDS,
    block_mass_rows,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_attention,
    dense_attention_bytes,
    kept_block_mass,
    stream_estimate,
    stream_estimate_reference,
)
from sparse_lens.kernels.estimate import ESTIMATORS, estimate_blocks
from sparse_lens.kernels.oracle import oracle_blocks
from sparse_lens.kernels.registry import REGISTRY
from sparse_lens.kernels.sparse_attention import kept_token_probs

__all__ = [
    "BACKENDS",
    "BlockGeometry",
    "ESTIMATORS",
    "REGISTRY",
    "block_mass_rows",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_attention",
    "dense_attention_bytes",
    "dense_block_mass",
    "estimate_blocks",
    "kept_block_mass",
    "kept_token_probs",
    "lagged_selection",
    "oracle_blocks",
    "stream_estimate",
    "stream_estimate_reference",
]
