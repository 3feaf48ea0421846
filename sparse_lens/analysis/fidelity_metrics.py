"""How true is a sparse trace to the model? Fidelity metrics against dense attention.

Metrics (see docs/fidelity.md), computed without any T x T tensor or [T / block, T / block]
matrix, so that they run at 32k-1M tokens on a GPU:
- ``pruned_fraction``: 1 - kept query-key pairs / the pairs each layer can see (causal, within its
  window), averaged over layers (``BlockSparsePattern.pruned_fraction``);
- ``mass_recall_mean`` / ``mass_recall_p5``: share of the dense softmax mass that falls in the
  kept blocks, per (layer, head, query block), mean and 5th percentile (``kept_block_mass``
  under the dense lse: one pass over the kept blocks);
- ``oracle_recall_mean`` and ``oracle_ratio``: the same for the exact top-k blocks by dense
  block mass (same budget; ``kernels.oracle_blocks``, streamed over query blocks), and
  estimator recall / oracle recall over the same query blocks;
- ``next_token_kl``: mean KL(dense || sparse) of the next-token distribution, and
  ``top1_agreement``: share of positions whose greedy next token agrees;
- ``final_kl`` / ``final_top1``: the same at the last position only;
- ``estimate_seconds``: wall time of the estimator calls (on the dense run's q, k).
Recall and next-token figures are taken over the query blocks and positions where pruning
happens (query blocks that see more than top_k key blocks, or more than ``min_blocks`` with
``estimator="adaptive"``); earlier ones are exact by design. For ``"adaptive"`` the oracle is the
exact top-k at the cap ``top_k``, an upper reference rather than an equal-budget one.

Layers with a sliding window, soft-cap or sinks are scored as the model runs them
(``pattern.window`` / ``softcap`` / ``sinks``): the masses are those of the capped, windowed
softmax, and a learned sink's share counts as kept (sparse attention always keeps it), so a row
that keeps every key it can see has recall 1. A layer whose window binds keeps its whole window
band (:func:`~sparse_lens.tl.windows.window_selection`) and runs no estimator: it is scored on
that band (recall 1 of what its window lets it see, its own oracle, ``pruned_fraction`` 0) in
its per-layer row, and, pruning none of its rows, adds no rows to the all-layer recall figures.

Without ``dense=``, each layer is scored inside the observe-mode forward (a ``hook_pattern``
hook reads that layer's q, k and dense lse, then lets them go), so memory stays that of one
forward; ``positions=`` limits the logits to a few positions (at 1M tokens a full
[T, vocab] logit tensor does not fit anywhere).

The dense run kept for reuse (``DenseTrace``, ``collect_dense``, ``model_fingerprint``,
``check_logits_fit``) lives in :mod:`sparse_lens.analysis.dense_trace`; its names are re-exported
here, their path before the split.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from sparse_lens.analysis.dense_trace import (  # noqa: F401  (re-exported: their public path before the split)
    DenseTrace,
    as_tokens,
    check_logits_fit,
    collect_dense,
    model_fingerprint,
)
from sparse_lens.analysis.fidelity_oracle import OracleCache, oracle_recall
from sparse_lens.analysis.positions import kept_positions, logits_kwargs
from sparse_lens.config import TracingConfig
from sparse_lens.errors import InvalidConfigError
from sparse_lens.kernels import estimate_blocks, kept_block_mass
from sparse_lens.kernels.blocks import tokens_per_block, visible_key_blocks
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.model import HookedSparseTransformer
from sparse_lens.tl.windows import window_selection


@torch.no_grad()
def fidelity(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "batch pos"] | str,
    stream: TracingConfig | None = None,
    *,
    dense: DenseTrace | None = None,
    verbose: bool = False,
    per_layer: bool = False,
    positions: Int[Tensor, "n_positions"] | None = None,
    oracle_stride: int = 1,
    oracle_cache: OracleCache | None = None,
) -> dict[str, float]:
    """Fidelity of ``stream`` (default: the model's) against dense attention on ``tokens`` (token ids
    ``[batch, pos]``, or a text, tokenized by ``model.to_tokens``; a token tensor else ``ShapeError``).

    Pass ``dense=collect_dense(model, tokens)`` to evaluate several configs on one dense run
    (a trace of other tokens, or made with another model, raises ``TraceMismatchError``).
    ``per_layer=True`` adds ``"layers"``: one dict per layer with its ``layer``,
    ``pruned_fraction`` and recall figures (``mass_recall_mean``, ``mass_recall_p5``,
    ``oracle_recall_mean``, ``oracle_ratio``). ``positions`` (ascending token positions; negative
    ones count from the end, ``-1`` the last, as in the patching tools; else
    ``InvalidPositionsError``, as there): the next-token figures are taken at those positions only
    (logits computed there only), and ``final_*`` at the last of them; without it every position's logits are kept
    (``ContextTooLongError`` up front where they would not fit: 17 GiB a forward at 16k tokens of
    a 262k vocabulary). ``oracle_stride``: the oracle is computed on every n-th pruned query block
    (it costs half a dense attention pass per layer); ``oracle_recall_mean`` and ``oracle_ratio``
    then compare estimator and oracle on those query blocks. ``oracle_cache`` (an
    ``OracleCache(dense)``, with ``dense=`` its trace, else ``InvalidConfigError``): the oracle of a
    (layer, budget) already scored on that trace is reused, not recomputed (same figures; for runs
    that score several configurations on one trace, :mod:`sparse_lens.analysis.fidelity_oracle`).
    """
    if not isinstance(oracle_stride, int) or oracle_stride < 1:
        raise InvalidConfigError(f"oracle_stride must be an int >= 1, got {oracle_stride!r}.")
    if oracle_cache is not None:
        oracle_cache.check_trace(dense)
    stream = stream or model.stream
    tokens = as_tokens(model, tokens)
    if dense is not None:
        dense.check_model(model)
        dense.check_tokens(tokens)
    seq_len = tokens.shape[-1]
    index = kept_positions(positions, seq_len, tokens.device, ascending=True)
    if positions is None:  # the sparse run's logits, and the dense run's unless a trace brings them
        check_logits_fit(model, tokens, 1 if dense is not None else 2, "fidelity")
    keep = logits_kwargs(index)  # the model calls' logits_to_keep (on the CPU: layers may span GPUs)
    searched = _pruned_rows(stream, seq_len)
    layers: list[dict] = []
    progress = tqdm(total=model.cfg.n_layers, desc="fidelity", disable=not verbose)

    def score(layer: int, query: Tensor, key: Tensor, lse: Tensor, scale: float, features: dict) -> None:
        layers.append({"layer": layer, **_score_layer(query, key, lse, scale, stream, searched, oracle_stride,
                                                      oracle=_oracle(layer, oracle_cache), **features)})
        progress.update()

    if dense is not None:
        for layer in range(model.cfg.n_layers):
            score(layer, dense.query[layer], dense.key[layer], dense.lse[layer], dense.scale, dense.features(layer))
        dense_logits = dense.logits if positions is None else dense.logits[:, index]
    else:
        hooks = [(f"blocks.{layer}.attn.hook_pattern",
                  lambda pattern, hook, layer=layer: score(layer, pattern.query, pattern.key, pattern.lse, pattern.scale,
                                                           {"window": pattern.window, "softcap": pattern.softcap,
                                                            "sinks": pattern.sinks}))
                 for layer in range(model.cfg.n_layers)]
        with model.stream_settings(mode="observe", keep_qk=True):
            dense_logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **keep).float()
    progress.close()
    with model.stream_settings(**{**stream.fields_dict(), "mode": "sparse", "keep_qk": False}):
        sparse_logits = model(tokens, **keep).float()
    recalls = torch.cat([row.pop("recall") for row in layers])
    sampled = torch.cat([row.pop("sampled_recall") for row in layers])
    oracles = torch.cat([row.pop("oracle") for row in layers])
    first = first_pruned_position(stream, seq_len)
    if positions is not None:  # score the kept positions at or after the first pruned one
        first = int((index < first).sum())
    report = {
        "seq_len": seq_len,
        "pruned_fraction": float(np.mean([row["pruned_fraction"] for row in layers])),
        **_recall_figures(recalls, sampled, oracles),
        "estimate_seconds": sum(row.pop("estimate_seconds") for row in layers),
        **next_token_figures(dense_logits, sparse_logits, first_position=first),
    }
    if per_layer:
        report["layers"] = layers
    return report


def _oracle(layer: int, cache: OracleCache | None):
    """The oracle-recall function of ``layer``: :func:`oracle_recall`, or through ``cache``."""
    return oracle_recall if cache is None else functools.partial(cache.recall, layer)


def _score_layer(query: Tensor, key: Tensor, lse: Tensor, scale: float, stream: TracingConfig, searched: Tensor,
                 oracle_stride: int, *, oracle=oracle_recall, window: int | None = None, softcap: float | None = None,
                 sinks: Tensor | None = None) -> dict:
    """One layer's figures: the estimate's kept mass under the dense lse, and the exact oracle
    (``oracle``: :func:`oracle_recall`'s signature); a layer whose window binds: its window band's
    (module docstring)."""
    geometry = {"query_block": stream.query_block, "key_block": stream.key_block}
    features = {"window": window, "softcap": softcap, "sinks": sinks}
    batch, heads, seq_len, _ = query.shape
    seconds = 0.0
    if window is not None:  # the model keeps the band and runs no estimator
        block_indices = window_selection(seq_len, batch=batch, heads=heads, top_k=stream.top_k, window=window,
                                         device=query.device, **geometry)
    else:
        _sync(query)
        started = time.perf_counter()
        block_indices = estimate_blocks(query, key, scale=scale, **stream.estimator_kwargs())
        _sync(query)
        seconds = time.perf_counter() - started
    kept = kept_block_mass(query, key, block_indices, lse, scale=scale, backend=stream.backend, **geometry, **features)
    pattern = BlockSparsePattern(block_indices, kept, lse, seq_len, scale=scale, mode="observe", **geometry, **features)
    sink_share = _sink_share(sinks, lse, stream.query_block)
    recall = pattern.recall().float() + sink_share
    if window is not None:  # every row exact: the band is its own oracle, and no row is pruned
        every_row = recall.flatten().cpu()
        nothing = torch.zeros(0)
        return {"pruned_fraction": pattern.pruned_fraction(), **_recall_figures(every_row, every_row, every_row),
                "recall": nothing, "sampled_recall": nothing, "oracle": nothing, "estimate_seconds": seconds}
    rows = torch.nonzero(searched.to(query.device)).flatten()
    sampled_rows = rows[::oracle_stride]
    oracle_recalls = oracle(query, key, lse, top_k=stream.top_k, scale=scale, rows=sampled_rows,
                            backend=stream.backend, **geometry, **features)
    figures = {"recall": recall[:, :, rows].flatten().cpu(), "sampled_recall": recall[:, :, sampled_rows].flatten().cpu(),
               "oracle": (oracle_recalls + sink_share[:, :, sampled_rows]).flatten().cpu()}
    return {"pruned_fraction": pattern.pruned_fraction(),
            **_recall_figures(figures["recall"], figures["sampled_recall"], figures["oracle"]),
            **figures, "estimate_seconds": seconds}


def _sink_share(sinks: Float[Tensor, "head"] | None, lse: Float[Tensor, "batch head seq"],
                query_block: int) -> Float[Tensor, "batch head n_query_blocks"]:
    """Each query block's mean probability on its head's learned sink, ``exp(sink - lse)`` (zeros
    without sinks): the share sparse attention always keeps."""
    if sinks is None:
        return torch.zeros(*lse.shape[:-1], -(-lse.shape[-1] // query_block), device=lse.device)
    probs = torch.exp(sinks.detach().to(device=lse.device, dtype=torch.float32)[:, None] - lse.float())
    probs = F.pad(probs, (0, -probs.shape[-1] % query_block)).unflatten(-1, (-1, query_block)).sum(-1)
    return probs / tokens_per_block(lse.shape[-1], query_block, device=lse.device)


def _sync(tensor: Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _pruned_rows(stream: TracingConfig, seq_len: int) -> Tensor:
    """Which query blocks can lose key blocks: they see more than the fewest a row may keep."""
    fewest_kept = getattr(stream.estimator_settings, "min_blocks", stream.top_k)  # "adaptive": its floor
    return visible_key_blocks(seq_len, stream.query_block, stream.key_block) > fewest_kept


def first_pruned_position(stream: TracingConfig, seq_len: int) -> int:
    """The first token position of the first query block that can lose key blocks under
    ``stream`` (``seq_len`` when none can): earlier positions attend exactly as dense attention."""
    rows = torch.nonzero(_pruned_rows(stream, seq_len))
    return int(rows[0]) * stream.query_block if len(rows) else seq_len


def _recall_figures(recall: Tensor, sampled_recall: Tensor, oracle: Tensor) -> dict[str, float]:
    """Recall over the pruned rows; oracle and ratio over the rows the oracle was computed on."""
    if recall.numel() == 0:  # nothing pruned: every row keeps all its blocks
        return {"mass_recall_mean": 1.0, "mass_recall_p5": 1.0, "oracle_recall_mean": 1.0, "oracle_ratio": 1.0}
    return {
        "mass_recall_mean": float(recall.mean()),
        "mass_recall_p5": float(torch.quantile(recall.float(), 0.05)),
        "oracle_recall_mean": float(oracle.mean()),
        "oracle_ratio": float(sampled_recall.mean() / oracle.mean()),
    }


def next_token_figures(dense_logits: Tensor, sparse_logits: Tensor, first_position: int,
                       chunk_elements: int = 2**24) -> dict[str, float]:
    """KL(dense || sparse) and top-1 agreement over positions >= first_position, and at the end.

    The log-softmaxes are taken ``chunk_elements // d_vocab`` positions at a time, so the extra
    memory is a few ``[batch, chunk, d_vocab]`` tensors rather than three ``[batch, pos, d_vocab]``
    ones (4.3 GB each at 4,096 tokens of a 262k-token vocabulary)."""
    if first_position >= dense_logits.shape[1]:
        dense_logits, sparse_logits, first_position = dense_logits[:, -1:], sparse_logits[:, -1:], 0
    step = max(1, chunk_elements // dense_logits.shape[-1])
    kls, agrees = [], []
    for start in range(first_position, dense_logits.shape[1], step):
        dense_logp = dense_logits[:, start:start + step].float().log_softmax(-1)
        sparse_logp = sparse_logits[:, start:start + step].float().log_softmax(-1)
        kls.append((dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1))
        agrees.append(dense_logp.argmax(-1) == sparse_logp.argmax(-1))
    kl, agree = torch.cat(kls, dim=1), torch.cat(agrees, dim=1)
    return {
        "next_token_kl": float(kl.mean()),
        "top1_agreement": float(agree.float().mean()),
        "final_kl": float(kl[:, -1].mean()),
        "final_top1": float(agree[:, -1].float().mean()),
        "positions_scored": int(kl.shape[1] * kl.shape[0]),
    }
