"""How true is a sparse trace to the model? Fidelity metrics against dense attention.

Metrics (see docs/fidelity.md), computed without any T x T tensor:
- ``pruned_fraction``: 1 - kept query-key pairs / causal pairs, over all layers and heads;
- ``mass_recall_mean`` / ``mass_recall_p5``: share of the dense softmax mass that falls in the
  kept blocks, per (layer, head, query block), mean and 5th percentile;
- ``oracle_recall_mean`` and ``oracle_ratio``: the same for the exact top-k blocks by dense
  block mass (same budget), and estimator recall / oracle recall;
- ``next_token_kl``: mean KL(dense || sparse) of the next-token distribution, and
  ``top1_agreement``: share of positions whose greedy next token agrees;
- ``final_kl`` / ``final_top1``: the same at the last position only;
- ``estimate_seconds``: wall time of the estimator calls (on the dense run's q, k).
Recall and next-token figures are taken over the query blocks and positions where pruning
happens (query blocks that see more than top_k key blocks, or more than ``min_blocks`` with
``estimator="adaptive"``); earlier ones are exact by design. For ``"adaptive"`` the oracle is the
exact top-k at the cap ``top_k``, an upper reference rather than an equal-budget one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from sparse_lens.config import StreamConfig
from sparse_lens.kernels import dense_block_mass, estimate_blocks
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.model import HookedSparseTransformer


@dataclass
class DenseTrace:
    """One dense (observe-mode) run: logits and each layer's rotated q, k and dense lse."""

    logits: Float[Tensor, "batch pos vocab"]
    query: list[Tensor]
    key: list[Tensor]
    lse: list[Tensor]
    scale: float
    _block_mass: dict = field(default_factory=dict, repr=False)

    def block_mass(self, layer: int, query_block: int, key_block: int) -> Float[Tensor, "batch head n_qb n_kb"]:
        """Dense mass of every (query block, key block) of a layer (computed once per geometry)."""
        cache_key = (layer, query_block, key_block)
        if cache_key not in self._block_mass:
            self._block_mass[cache_key] = dense_block_mass(
                self.query[layer], self.key[layer], self.lse[layer],
                query_block=query_block, key_block=key_block, scale=self.scale,
            )
        return self._block_mass[cache_key]


def collect_dense(model: HookedSparseTransformer, tokens: Int[Tensor, "batch pos"]) -> DenseTrace:
    """Run the model once with dense attention (observe mode), keeping what fidelity needs."""
    with torch.no_grad(), model.stream_settings(mode="observe", keep_qk=True):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns: list[BlockSparsePattern] = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    return DenseTrace(
        logits=logits.float(),
        query=[p.query for p in patterns],
        key=[p.key for p in patterns],
        lse=[p.lse for p in patterns],
        scale=patterns[0].scale,
    )


@torch.no_grad()
def fidelity(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "batch pos"],
    stream: StreamConfig | None = None,
    *,
    dense: DenseTrace | None = None,
    verbose: bool = False,
    per_layer: bool = False,
) -> dict[str, float]:
    """Fidelity of ``stream`` (default: the model's) against dense attention on ``tokens``.

    Pass ``dense=collect_dense(model, tokens)`` to evaluate several configs on one dense run.
    ``per_layer=True`` adds ``"layers"``: one dict per layer with its ``layer``,
    ``pruned_fraction`` and recall figures (``mass_recall_mean``, ``mass_recall_p5``,
    ``oracle_recall_mean``, ``oracle_ratio``).
    """
    stream = stream or model.stream
    dense = dense or collect_dense(model, tokens)
    seq_len = tokens.shape[-1]
    searched = _pruned_rows(stream, seq_len)
    recalls, oracle_recalls, pruned, layers, estimate_seconds = [], [], [], [], 0.0
    for layer in tqdm(range(model.cfg.n_layers), desc="fidelity", disable=not verbose):
        query, key, lse = dense.query[layer], dense.key[layer], dense.lse[layer]
        geometry = {"query_block": stream.query_block, "key_block": stream.key_block}
        started = time.perf_counter()
        block_indices = estimate_blocks(query, key, scale=dense.scale, **stream.estimator_kwargs())
        estimate_seconds += time.perf_counter() - started
        all_blocks = dense.block_mass(layer, stream.query_block, stream.key_block)
        kept = all_blocks.gather(-1, block_indices.clamp(min=0)) * (block_indices >= 0)  # dense mass of kept blocks
        pattern = BlockSparsePattern(block_indices, kept, lse, seq_len, scale=dense.scale, mode="observe", **geometry)
        pruned.append(pattern.pruned_fraction())
        recalls.append(pattern.recall()[:, :, searched].flatten())
        oracle = all_blocks.topk(min(stream.top_k, all_blocks.shape[-1]), dim=-1).values.sum(-1)
        oracle_recalls.append(oracle[:, :, searched].flatten())
        if per_layer:
            layers.append({"layer": layer, "pruned_fraction": pruned[-1],
                           **_recall_figures(recalls[-1], oracle_recalls[-1])})
    with model.stream_settings(**{**stream.to_dict(), "mode": "sparse", "keep_qk": False}):
        sparse_logits = model(tokens).float()
    report = {
        "seq_len": seq_len,
        "pruned_fraction": float(np.mean(pruned)),
        **_recall_figures(torch.cat(recalls), torch.cat(oracle_recalls)),
        "estimate_seconds": estimate_seconds,
        **_next_token_figures(dense.logits, sparse_logits, first_position=_first_pruned_position(stream, seq_len)),
    }
    if per_layer:
        report["layers"] = layers
    return report


def _pruned_rows(stream: StreamConfig, seq_len: int) -> Tensor:
    """Which query blocks can lose key blocks: they see more than the fewest a row may keep."""
    fewest_kept = stream.min_blocks if stream.estimator == "adaptive" else stream.top_k
    return visible_key_blocks(seq_len, stream.query_block, stream.key_block) > fewest_kept


def _first_pruned_position(stream: StreamConfig, seq_len: int) -> int:
    rows = torch.nonzero(_pruned_rows(stream, seq_len))
    return int(rows[0]) * stream.query_block if len(rows) else seq_len


def _recall_figures(recall: Tensor, oracle: Tensor) -> dict[str, float]:
    if recall.numel() == 0:  # nothing pruned: every row keeps all its blocks
        return {"mass_recall_mean": 1.0, "mass_recall_p5": 1.0, "oracle_recall_mean": 1.0, "oracle_ratio": 1.0}
    return {
        "mass_recall_mean": float(recall.mean()),
        "mass_recall_p5": float(torch.quantile(recall.float(), 0.05)),
        "oracle_recall_mean": float(oracle.mean()),
        "oracle_ratio": float(recall.mean() / oracle.mean()),
    }


def _next_token_figures(dense_logits: Tensor, sparse_logits: Tensor, first_position: int) -> dict[str, float]:
    """KL(dense || sparse) and top-1 agreement over positions >= first_position, and at the end."""
    dense_logp = dense_logits[:, first_position:].log_softmax(-1)
    sparse_logp = sparse_logits[:, first_position:].log_softmax(-1)
    if dense_logp.shape[1] == 0:
        dense_logp, sparse_logp = dense_logits[:, -1:].log_softmax(-1), sparse_logits[:, -1:].log_softmax(-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)
    agree = dense_logp.argmax(-1) == sparse_logp.argmax(-1)
    return {
        "next_token_kl": float(kl.mean()),
        "top1_agreement": float(agree.float().mean()),
        "final_kl": float(kl[:, -1].mean()),
        "final_top1": float(agree[:, -1].float().mean()),
        "positions_scored": int(kl.shape[1] * kl.shape[0]),
    }
