"""Two-stage estimators (torch references): a wide hierarchical search, then exact block masses.

- :func:`rescored_estimate`: the bounds search (or pooled) keeps ``beam * n_search`` candidate
  blocks; each candidate's *exact* block log-sum-exp is computed per query (every
  ``query_stride``-th query), turned into a per-query softmax over candidates + sink + local,
  averaged over the block's queries, and the ``n_search`` heaviest are kept. Time: the search at
  ``top_k' = sink + local + beam * n_search`` plus O(n_qb * beam * n_search * (query_block /
  query_stride) * key_block * D), i.e. attention logits over the candidates; memory O(T).
  With pooled statistics alone (mean keys, with or without variance, exhaustive or
  hierarchical) no score reached more than ~0.95 of the exact top-k oracle's recall on the
  default model: heads that attend to a few specific keys need token-level scores.
- :func:`adaptive_estimate`: the search with ``top_k = max_blocks`` candidates; per (head,
  query block) keeps the smallest set of the heaviest candidates whose estimated mass reaches
  ``p`` (at least ``min_blocks``, at most ``max_blocks``; sink and local blocks always kept and
  counted). The estimated mass of a candidate is a per-query softmax over the candidates' block
  log-masses, averaged over the block's queries, the log-masses either exact
  (``estimate="exact"``, the rescoring above) or the mean-key estimate
  ``scale * q . mean_key(b) + log n_b`` (``"pooled"``; first order, a lower bound by Jensen;
  sink and local blocks exact). Shares are normalised over the candidates: mass in blocks the
  search discarded is not counted, so ``p`` is a knob, not a guarantee. Output width
  ``max_blocks``, ``-1`` in unused slots.

Same output contract as every estimator (see ``search.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_lens.kernels.blocks import (
    UNUSED_SLOT,
    BlockGeometry,
    fixed_blocks,
    gather_per_head,
    pad_to_blocks,
    query_blocks_per_chunk,
    real_query_mask,
    sort_block_row,
    split_into_blocks,
    visible_key_blocks,
)
from sparse_lens.kernels.checks import check_attention_inputs
from sparse_lens.kernels.dispatch import (
    Backend,
    bounds_estimate_unchecked,
    rescore_top_k_unchecked,
    rescore_top_p_unchecked,
    stream_estimate_unchecked,
)
from sparse_lens.kernels.search import (
    SEARCHES,
    SearchName,
    key_block_prefix_sums,
    pooled_estimate_unchecked,
    range_mean_keys,
)

MassEstimate = Literal["pooled", "exact"]


def exact_block_log_mass(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    blocks: Int[Tensor, "batch q_head chunk width"],
    block_ids: Int[Tensor, "chunk"],
    *,
    query_block: int,
    key_block: int,
    scale: float,
    query_slots: Int[Tensor, "n_query"] | None = None,
) -> Float[Tensor, "batch q_head chunk n_query width"]:
    """Exact causal log-sum-exp of ``scale * q . k`` over each listed key block, per query
    (``-inf`` for ``-1`` slots and for queries that see none of the block's keys).
    ``query_blocks`` holds the queries at ``query_slots`` of each block (default: all)."""
    seq_len = key.shape[2]
    valid = blocks >= 0
    if query_slots is None:
        query_slots = torch.arange(query_block, device=key.device)
    key_positions = blocks.clamp(min=0)[..., None] * key_block + torch.arange(key_block, device=key.device)
    key_tokens = gather_per_head(pad_to_blocks(key.float(), key_block), key_positions)  # [b, h, chunk, w, bk, d]
    logits = torch.einsum("bhjqd,bhjwkd->bhjqwk", query_blocks, key_tokens) * scale
    query_positions = block_ids[:, None] * query_block + query_slots
    visible = (key_positions[:, :, :, None] <= query_positions[None, None, :, :, None, None]) & (
        key_positions[:, :, :, None] < seq_len) & valid[:, :, :, None, :, None]
    return torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)


def pooled_log_mass(
    query_blocks: Float[Tensor, "batch q_head chunk query_block d_head"],
    sums: Float[Tensor, "batch kv_head n_key_blocks_plus_1 d_head"],
    counts: Int[Tensor, "n_key_blocks_plus_1"],
    blocks: Int[Tensor, "batch q_head chunk width"],
    *,
    scale: float,
) -> Float[Tensor, "batch q_head chunk query_block width"]:
    """Estimated log-sum-exp of each block per query: ``scale * q . mean_key + log n_keys``
    (first order; a lower bound by Jensen). ``-inf`` for ``-1`` slots."""
    block = blocks.clamp(min=0)
    mean_keys = range_mean_keys(sums, counts, block, block + 1)
    estimate = torch.einsum("bhjqd,bhjcd->bhjqc", query_blocks, mean_keys) * scale
    estimate = estimate + torch.log((counts[block + 1] - counts[block]).float())[:, :, :, None, :]
    return estimate.masked_fill(~(blocks >= 0)[:, :, :, None, :], float("-inf"))


def estimated_block_mass(
    log_mass: Float[Tensor, "batch q_head chunk query_block width"],
    real_queries: Bool[Tensor, "chunk query_block"],
) -> Float[Tensor, "batch q_head chunk width"]:
    """Per-query softmax over the candidates, averaged over the block's real queries."""
    probs = torch.softmax(log_mass, dim=-1).nan_to_num(0.0) * real_queries[None, None, :, :, None]
    return probs.sum(3) / real_queries.sum(-1).clamp(min=1)[None, None, :, None]


def fixed_slot_mask(
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    sink_blocks: int,
    local_blocks: int,
) -> Bool[Tensor, "batch q_head n_query_blocks width"]:
    """Which candidate slots hold a sink or local block (always kept)."""
    n_visible = visible_key_blocks(seq_len, query_block, key_block, device=candidates.device)
    fixed = fixed_blocks(n_visible, sink_blocks, local_blocks)
    return (candidates[..., None] == fixed[None, None, :, None, :]).any(-1) & (candidates >= 0)


def candidate_block_mass(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    sink_blocks: int,
    local_blocks: int,
    estimate: MassEstimate = "exact",
    scale: float | None = None,
    query_stride: int = 1,
) -> Float[Tensor, "batch q_head n_query_blocks width"]:
    """Share of each query block's attention that each candidate receives, normalised over the
    candidates: per query a softmax over the candidates' block log-masses, averaged over the
    block's queries (every ``query_stride``-th one, counted from the block's last query).

    ``estimate="exact"``: every candidate's exact causal log-sum-exp (the cost of attention over
    the candidates, O(width * query_block * key_block * D) per query block). ``"pooled"``: the
    mean-key estimate for searched blocks and the exact value for sink and local blocks.
    """
    batch, n_q_heads, seq_len, d_head = query.shape
    scale = d_head**-0.5 if scale is None else scale
    width = candidates.shape[-1]
    query_blocks = split_into_blocks(query, query_block)
    always_keep = fixed_slot_mask(candidates, seq_len=seq_len, query_block=query_block, key_block=key_block,
                                  sink_blocks=sink_blocks, local_blocks=local_blocks)
    slots = torch.arange(query_block - 1, -1, -query_stride, device=query.device).flip(0)
    if estimate not in ("pooled", "exact"):
        raise ValueError(f"estimate must be 'pooled' or 'exact', got {estimate!r}.")
    sums, counts = key_block_prefix_sums(key, key_block) if estimate == "pooled" else (None, None)
    exact_width = width if estimate == "exact" else sink_blocks + local_blocks
    chunk = query_blocks_per_chunk(batch * n_q_heads * len(slots) * (width * 16 + exact_width * key_block * 12)
                                   + batch * n_q_heads * width * key_block * d_head * 4)
    masses = []
    for first in range(0, candidates.shape[2], chunk):
        block_ids = torch.arange(first, min(first + chunk, candidates.shape[2]), device=query.device)
        rows, keep = candidates[:, :, block_ids], always_keep[:, :, block_ids]
        queries = query_blocks[:, :, block_ids][:, :, :, slots]
        exact_kwargs = dict(query_block=query_block, key_block=key_block, scale=scale, query_slots=slots)
        if estimate == "exact":
            log_mass = exact_block_log_mass(queries, key, rows, block_ids, **exact_kwargs)
        else:
            log_mass = pooled_log_mass(queries, sums, counts, rows, scale=scale)
            fixed_only = torch.where(keep, rows, torch.full_like(rows, UNUSED_SLOT))
            exact = exact_block_log_mass(queries, key, fixed_only, block_ids, **exact_kwargs)
            log_mass = torch.where(keep[:, :, :, None, :], exact, log_mass)
        masses.append(estimated_block_mass(log_mass, real_query_mask(block_ids, query_block, seq_len)[:, slots]))
    return torch.cat(masses, dim=2)


def select_heaviest(
    candidates: Int[Tensor, "batch q_head rows width"],
    block_mass: Float[Tensor, "batch q_head rows width"],
    always_keep: Bool[Tensor, "batch q_head rows width"],
    n_keep: Int[Tensor, "batch q_head rows 1"] | int,
) -> Int[Tensor, "batch q_head rows width"]:
    """Keep the ``always_keep`` slots and then the heaviest, ``n_keep`` valid slots in all;
    ascending, ``-1`` elsewhere (same width)."""
    valid = candidates >= 0
    rank_key = block_mass.masked_fill(~valid, -1.0) + always_keep.float() * 2.0
    order = rank_key.argsort(dim=-1, descending=True, stable=True)
    slot = torch.arange(candidates.shape[-1], device=candidates.device)
    n_keep = torch.minimum(torch.as_tensor(n_keep, device=candidates.device), valid.sum(-1, keepdim=True))
    kept = torch.where(slot < n_keep, candidates.gather(-1, order), torch.full_like(candidates, UNUSED_SLOT))
    return sort_block_row(kept)


def exact_candidate_mass(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    scale: float | None = None,
    query_stride: int = 1,
) -> Float[Tensor, "batch q_head n_query_blocks width"]:
    """``candidate_block_mass`` with exact masses: per query (every ``query_stride``-th, counted
    from the block's last) a softmax over the candidates' exact block log-sum-exps, averaged over
    the block's real queries; 0 for ``-1`` slots. The oracle of ``exact_candidate_mass_triton``."""
    return candidate_block_mass(query, key, candidates, query_block=query_block, key_block=key_block,
                                sink_blocks=0, local_blocks=0, estimate="exact", scale=scale,
                                query_stride=query_stride)


def rescore_top_k(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float | None = None,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Steps 2-3 of ``rescored_estimate`` on given candidates: exact masses, then sink, local and
    the heaviest (``keep_heaviest``). The oracle of ``rescore_top_k_triton``."""
    mass = exact_candidate_mass(query, key, candidates, query_block=query_block, key_block=key_block,
                                scale=scale, query_stride=query_stride)
    return keep_heaviest(candidates, mass, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                         top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)


def rescore_top_p(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    *,
    query_block: int,
    key_block: int,
    sink_blocks: int,
    local_blocks: int,
    p: float,
    min_blocks: int,
    scale: float | None = None,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks width"]:
    """Steps 2-3 of ``adaptive_estimate`` (exact mass) on given candidates: exact masses, then
    ``select_top_p``. The oracle of ``rescore_top_p_triton``."""
    mass = exact_candidate_mass(query, key, candidates, query_block=query_block, key_block=key_block,
                                scale=scale, query_stride=query_stride)
    always_keep = fixed_slot_mask(candidates, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                                  sink_blocks=sink_blocks, local_blocks=local_blocks)
    return select_top_p(candidates, mass, always_keep, p=p, min_blocks=min_blocks)


# ---------------------------------------------------------------------------------------------
# Rescored search: a wide hierarchical search, then exact masses of its candidates
# ---------------------------------------------------------------------------------------------
def rescored_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    beam: int = 4,
    search: SearchName = "bounds",
    representative_keys: int = 8,
    scale: float | None = None,
    query_stride: int = 1,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Hierarchical search with ``beam`` times the branches, then exact rescoring.

    1. ``search`` (``"stream"``, ``"bounds"`` or ``"pooled"``) keeps ``beam * n_search``
       candidate blocks (``n_search = top_k - sink - local``); ``representative_keys`` is
       Stream's.
    2. Each candidate's exact block log-sum-exp per query (keys read in full); per query a
       softmax over candidates, sink and local blocks, averaged over the block's queries (every
       ``query_stride``-th query, counted from the block's last one).
    3. Keep sink, local and the ``n_search`` heaviest candidates.
    Cost: the search at ``top_k' = sink + local + beam * n_search`` plus
    O(beam * n_search * (query_block / query_stride) * key_block * D) per query block (attention
    logits over the candidates); memory O(T) plus a chunk's scratch.
    """
    check_attention_inputs(query, key)
    geometry = BlockGeometry(query_block, key_block, top_k, sink_blocks, local_blocks)
    if beam < 1:
        raise ValueError("beam must be >= 1.")
    return rescored_estimate_unchecked(query, key, geometry, beam=beam, search=search, scale=scale,
                                       representative_keys=representative_keys, query_stride=query_stride,
                                       backend="reference")


def rescored_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    beam: int,
    search: SearchName,
    representative_keys: int,
    scale: float | None,
    query_stride: int,
    backend: Backend,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``rescored_estimate`` on validated inputs, on ``backend``: the one composition of the
    rescored estimator. The search (``search_candidates``: Stream's or the bounds search on its
    kernel when ``backend`` picks Triton) keeps ``sink + local + beam * n_search`` candidates; the rescoring
    (``dispatch.rescore_top_k_unchecked``: this module's ``rescore_top_k`` or the fused
    ``rescore_top_k_triton``, chosen by ``backend``) computes their exact masses and keeps the
    heaviest."""
    wide = geometry.replace(top_k=geometry.n_fixed + beam * geometry.n_search)
    candidates = search_candidates(query, key, search, wide, representative_keys=representative_keys, backend=backend)
    return rescore_top_k_unchecked(query, key, candidates, geometry, scale=scale, query_stride=query_stride,
                                   backend=backend)


def keep_heaviest(
    candidates: Int[Tensor, "batch q_head n_query_blocks width"],
    block_mass: Float[Tensor, "batch q_head n_query_blocks width"],
    *,
    seq_len: int,
    query_block: int,
    key_block: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Step 3 of ``rescored_estimate``: sink and local blocks, then the heaviest candidates."""
    always_keep = fixed_slot_mask(candidates, seq_len=seq_len, query_block=query_block, key_block=key_block,
                                  sink_blocks=sink_blocks, local_blocks=local_blocks)
    return select_heaviest(candidates, block_mass, always_keep, top_k)[..., :top_k]


# ---------------------------------------------------------------------------------------------
# Adaptive budget: smallest set of candidates reaching an estimated mass p
# ---------------------------------------------------------------------------------------------
def select_top_p(
    candidates: Int[Tensor, "batch q_head rows width"],
    block_mass: Float[Tensor, "batch q_head rows width"],
    always_keep: Bool[Tensor, "batch q_head rows width"],
    *,
    p: float,
    min_blocks: int,
) -> Int[Tensor, "batch q_head rows width"]:
    """Smallest set of candidates, best first (``always_keep`` ones first of all), whose mass
    reaches ``p``; at least ``min_blocks`` (or all valid ones), ascending, ``-1`` elsewhere."""
    valid = candidates >= 0
    rank_key = block_mass.masked_fill(~valid, -1.0) + always_keep.float() * 2.0
    sorted_mass = block_mass.masked_fill(~valid, 0.0).gather(-1, rank_key.argsort(dim=-1, descending=True, stable=True))
    mass_before = sorted_mass.cumsum(-1) - sorted_mass
    n_keep = (mass_before < p).sum(-1, keepdim=True)
    n_keep = torch.maximum(n_keep, always_keep.sum(-1, keepdim=True)).clamp(min=min_blocks)
    return select_heaviest(candidates, block_mass, always_keep, n_keep)


def adaptive_estimate(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    p: float = 0.9,
    min_blocks: int = 4,
    max_blocks: int = 64,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    search: SearchName = "bounds",
    estimate: MassEstimate = "exact",
    scale: float | None = None,
    query_stride: int = 1,
    representative_keys: int = 8,
) -> Int[Tensor, "batch q_head n_query_blocks max_blocks"]:
    """Adaptive budget: per (head, query block) the smallest set of candidates reaching mass ``p``.

    1. Candidates: ``search`` (``"stream"``, ``"bounds"`` or ``"pooled"``) with ``top_k =
       max_blocks`` (rows seeing at most ``max_blocks`` key blocks: all of them).
    2. Their mass (``candidate_block_mass``): per query a softmax over the candidates' block
       log-masses, averaged over the block's queries; ``estimate="exact"`` uses exact block
       log-sum-exps (the rescoring of ``rescored_estimate``), ``"pooled"`` the mean-key estimate
       ``scale * q . mean_key + log n_keys`` (exact for sink / local blocks); every
       ``query_stride``-th query of the block is used. Either way the shares are normalised over
       the candidates: mass the search discarded is not counted, so the kept dense mass is
       below ``p`` when the candidates miss mass (``p`` is a knob, not a guarantee).
    3. Keep sink and local blocks, then the heaviest candidates until the kept mass reaches
       ``p``; at least ``max(min_blocks, sink + local)``, at most ``max_blocks``.
    Output width ``max_blocks``, ``-1`` in unused slots. Cost: the search at ``top_k =
    max_blocks`` plus the mass estimate (exact: attention logits over the ``max_blocks``
    candidates; pooled: O(max_blocks * query_block * D) per query block).
    """
    if estimate == "exact":
        check_attention_inputs(query, key)
        geometry = BlockGeometry(query_block, key_block, max_blocks, sink_blocks, local_blocks)
        return adaptive_estimate_unchecked(query, key, geometry, p=p, min_blocks=min_blocks, search=search,
                                           representative_keys=representative_keys, scale=scale,
                                           query_stride=query_stride, backend="reference")
    candidates, mass, always_keep = adaptive_candidates(
        query, key, query_block=query_block, key_block=key_block, max_blocks=max_blocks,
        sink_blocks=sink_blocks, local_blocks=local_blocks, search=search, estimate=estimate, scale=scale,
        query_stride=query_stride, representative_keys=representative_keys,
    )
    return select_top_p(candidates, mass, always_keep, p=p, min_blocks=min_blocks)


def adaptive_estimate_unchecked(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    geometry: BlockGeometry,
    *,
    p: float,
    min_blocks: int,
    search: SearchName,
    representative_keys: int,
    scale: float | None,
    query_stride: int,
    backend: Backend,
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """``adaptive_estimate`` (exact masses, ``max_blocks = geometry.top_k``) on validated inputs,
    on ``backend``: the search keeps ``top_k`` candidates, the rescoring
    (``dispatch.rescore_top_p_unchecked``: ``rescore_top_p`` or the fused ``rescore_top_p_triton``)
    keeps per row the fewest heaviest reaching ``p``."""
    candidates = search_candidates(query, key, search, geometry, representative_keys=representative_keys,
                                   backend=backend)
    return rescore_top_p_unchecked(query, key, candidates, geometry, p=p, min_blocks=min_blocks, scale=scale,
                                   query_stride=query_stride, backend=backend)


def adaptive_candidates(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    *,
    query_block: int,
    key_block: int,
    max_blocks: int,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    search: SearchName = "bounds",
    estimate: MassEstimate = "exact",
    scale: float | None = None,
    query_stride: int = 1,
    representative_keys: int = 8,
) -> tuple[
    Int[Tensor, "batch q_head n_query_blocks max_blocks"],
    Float[Tensor, "batch q_head n_query_blocks max_blocks"],
    Bool[Tensor, "batch q_head n_query_blocks max_blocks"],
]:
    """Steps 1-2 of ``adaptive_estimate``: ``(candidates, mass, always-kept mask)``, so that
    several ``p`` can be tried with ``select_top_p`` on one search."""
    check_attention_inputs(query, key)
    geometry = BlockGeometry(query_block, key_block, max_blocks, sink_blocks, local_blocks)
    candidates = search_candidates(query, key, search, geometry, representative_keys=representative_keys)
    mass = candidate_block_mass(query, key, candidates, query_block=query_block, key_block=key_block,
                                sink_blocks=sink_blocks, local_blocks=local_blocks, estimate=estimate, scale=scale,
                                query_stride=query_stride)
    return candidates, mass, fixed_slot_mask(candidates, seq_len=query.shape[2], query_block=query_block,
                                             key_block=key_block, sink_blocks=sink_blocks, local_blocks=local_blocks)


def search_candidates(
    query: Float[Tensor, "batch q_head seq d_head"],
    key: Float[Tensor, "batch kv_head seq d_head"],
    search: SearchName,
    geometry: BlockGeometry,
    *,
    representative_keys: int = 8,
    backend: Backend = "reference",
) -> Int[Tensor, "batch q_head n_query_blocks top_k"]:
    """Candidates of a hierarchical search by name, on validated inputs: ``"stream"`` (on
    ``backend``, see ``dispatch.py``; ``representative_keys`` is its setting), ``"bounds"`` (on
    ``backend``: ``bounds_triton`` or ``search.py``) or ``"pooled"`` (torch)."""
    if search == "stream":
        return stream_estimate_unchecked(query, key, geometry, representative_keys=representative_keys, backend=backend)
    if search == "pooled":
        return pooled_estimate_unchecked(query, key, geometry)
    if search == "bounds":
        return bounds_estimate_unchecked(query, key, geometry, backend=backend)
    raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")
