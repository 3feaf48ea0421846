"""Sparse sentence attention (step 1 of the method) from the kept blocks of a
``BlockSparsePattern`` only, O(T / block x top_k) cells per head, and never a T x T tensor.

- ``block_mass`` only (``token_level=False``, **approximation**): each kept (query block, key
  block) cell's total mass ``block_mass x n_queries`` is shared among the sentence pairs
  overlapping the cell in proportion to the number of causal token pairs ``(q, k), k <= q`` each
  sentence pair has in the cell (off the diagonal: the product of the token overlaps), i.e.
  attention is treated as uniform inside a cell. Mass in pruned cells counts as 0. When every
  sentence boundary falls on a block boundary and nothing is pruned, the result is exact.
- ``token_level=True``: the kept cells only, but each split by its exact token weights
  ``exp(q.k * scale - lse)`` recomputed from the pattern's rotated q/k (``keep_qk=True``), in time
  O(kept pairs) like the sparse attention itself. Pruned cells count as 0, so in observe mode
  every entry is a lower bound of the dense one, and the result is exact whenever nothing is
  pruned, aligned or not.

The kept cells are summed either into the [head, n, n] matrix (``sentence_attention_sparse``) or,
without it, straight into per-source sums over the receivers (``vertical_scores_sparse`` in
``sparse_lens.analysis.anchors.salience``: long traces have thousands of sentences).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_lens.analysis.anchors.sentences import Span, check_sentence_spans, sentence_sizes
from sparse_lens.kernels.blocks import blocks_overlapping, num_blocks
from sparse_lens.kernels.sparse_attention import kept_scores_by_chunk, probs_from_lse
from sparse_lens.pattern import BlockSparsePattern


def sentence_attention_sparse(
    pattern: BlockSparsePattern, spans: Sequence[Span], *, batch: int = 0, token_level: bool = False
) -> Float[Tensor, "head n n"]:
    """Sentence attention of one layer from the kept blocks only (see the module docstring for
    the approximation; ``token_level=True``: exact token probabilities of the kept cells, from the
    pattern's q/k). Materialises [head, n, n]; ``vertical_scores_sparse`` avoids it. A pattern
    sliced along queries contributes the rows it holds only."""
    spans = check_sentence_spans(spans, pattern.seq_len)
    return accumulate_sentence_attention(pattern, spans, batch, token_level, proximity=None).float()


def _causal_pairs(q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor) -> Tensor:
    """Number of pairs (q, k) with q in [q0, q1), k in [k0, k1) and k <= q (empty ranges give 0)."""
    q_last, k_last = q1 - 1, k1 - 1
    ramp_first, ramp_last = torch.maximum(q0, k0), torch.minimum(q_last, k_last)
    ramp_len = (ramp_last - ramp_first + 1).clamp(min=0)
    ramp = ramp_len * ((ramp_first - k0 + 1) + (ramp_last - k0 + 1)) // 2
    full_queries = (q_last - torch.maximum(q0, k1) + 1).clamp(min=0)
    full = full_queries * (k1 - k0).clamp(min=0)
    valid = (q1 > q0) & (k1 > k0)
    return torch.where(valid, ramp + full, torch.zeros_like(ramp))


def _block_sentence_overlaps(spans: Sequence[Span], n_blocks: int, block: int, seq_len: int):
    """For each block: the sentences it overlaps, as [n_blocks, m] sentence ids (-1 padded) and the
    overlapping token ranges [n_blocks, m] (start, end)."""
    starts = torch.tensor([a for a, _ in spans])
    ends = torch.tensor([b for _, b in spans])
    block_first = torch.arange(n_blocks) * block
    block_end = (block_first + block).clamp(max=seq_len)
    lo = torch.searchsorted(ends, block_first, right=True)  # first sentence ending after the block starts
    hi = torch.searchsorted(starts, block_end, right=False)  # first sentence starting at or after its end
    width = max(1, int((hi - lo).max()))
    ids = lo[:, None] + torch.arange(width)[None, :]
    valid = ids < hi[:, None]
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    safe = ids.clamp(min=0, max=len(spans) - 1)
    first = torch.maximum(starts[safe], block_first[:, None])
    end = torch.minimum(ends[safe], block_end[:, None])
    end = torch.where(valid, end, first)
    return ids, first, end


def _sparse_sentence_cells(pattern: BlockSparsePattern, spans: Sequence[Span], batch: int, max_elements: int = 2**21):
    """Yield ``(value, receiver, source)`` per chunk of query blocks, from ``block_mass`` only.

    ``value``: float32 [head, rows, top_k, mq, mk], the mass each kept cell gives to the pair
    (the mq sentences overlapping its query block) x (the mk sentences overlapping its key
    block), shared in proportion to causal token pairs; ``receiver``: sentence ids [1, rows, 1,
    mq, 1] and ``source``: [head, rows, top_k, 1, mk], -1 where no sentence.
    """
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    n_query_blocks, n_key_blocks = num_blocks(seq_len, qb), num_blocks(seq_len, kb)
    q_ids, q_first, q_end = _block_sentence_overlaps(spans, n_query_blocks, qb, seq_len)
    k_ids, k_first, k_end = _block_sentence_overlaps(spans, n_key_blocks, kb, seq_len)
    q_len, k_len = (q_end - q_first).float(), (k_end - k_first).float()
    indices = pattern.block_indices[batch].cpu()  # [head, rows, top_k]
    mass = pattern.block_mass[batch].detach().cpu().float()
    n_heads, n_rows, top_k = indices.shape
    mq, mk = q_ids.shape[1], k_ids.shape[1]
    rows_per_chunk = max(1, max_elements // max(1, n_heads * top_k * mq * mk))
    for row0 in range(0, n_rows, rows_per_chunk):
        rows = torch.arange(row0, min(row0 + rows_per_chunk, n_rows))
        blocks = rows + pattern.first_query_block  # [r]
        if not bool((q_ids[blocks] >= 0).any()):
            continue
        kept = indices[:, rows]  # [h, r, k]
        used = kept >= 0
        key_blocks = kept.clamp(min=0)
        q_lo = blocks * qb
        q_hi = (q_lo + qb).clamp(max=seq_len)
        k_lo = key_blocks * kb
        k_hi = (k_lo + kb).clamp(max=seq_len)
        total = mass[:, rows] * (q_hi - q_lo)[None, :, None].float()  # probability summed over queries
        # Off the diagonal every (query, key) pair of a cell is causal: share by overlap products.
        sub = q_len[blocks][None, :, None, :, None] * k_len[key_blocks][..., None, :]
        cell = ((q_hi - q_lo)[None, :, None] * (k_hi - k_lo)).float()
        diagonal = used & (k_hi > q_lo[None, :, None])
        if bool(diagonal.any()):  # cells reaching the query block: count causal pairs only
            hd, rd, kd = diagonal.nonzero(as_tuple=True)
            kbd, bd = key_blocks[hd, rd, kd], blocks[rd]
            sub[hd, rd, kd] = _causal_pairs(
                q_first[bd][:, :, None], q_end[bd][:, :, None], k_first[kbd][:, None, :], k_end[kbd][:, None, :]
            ).float()
            cell[hd, rd, kd] = _causal_pairs(q_lo[rd], q_hi[rd], k_lo[hd, rd, kd], k_hi[hd, rd, kd]).float()
        share = torch.where(used, total / cell.clamp(min=1), 0.0)
        source = torch.where(used[..., None], k_ids[key_blocks], -1)
        yield share[..., None, None] * sub, q_ids[blocks][None, :, None, :, None], source[..., None, :]


def _kept_token_sentence_cells(pattern: BlockSparsePattern, spans: Sequence[Span], batch: int):
    """As ``_sparse_sentence_cells``, but each kept cell's mass is split by its exact token
    probabilities ``exp(q.k * scale - lse)``, recomputed from the pattern's rotated q/k (time
    O(kept pairs), like the sparse attention itself)."""
    if pattern.query is None or pattern.key is None:
        raise ValueError("Token-level sparse aggregation needs the pattern's queries/keys (TracingConfig.keep_qk=True).")
    if pattern.is_sliced:
        raise ValueError("Token-level sparse aggregation needs the whole pattern; this one was sliced along queries.")
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    q_ids, q_first, q_end = _block_sentence_overlaps(spans, num_blocks(seq_len, qb), qb, seq_len)
    k_ids, k_first, k_end = _block_sentence_overlaps(spans, num_blocks(seq_len, kb), kb, seq_len)
    lse = pattern.lse[batch: batch + 1].float()
    lse_blocks = torch.nn.functional.pad(lse, (0, num_blocks(seq_len, qb) * qb - seq_len)).unflatten(2, (-1, qb))
    indices = pattern.block_indices[batch: batch + 1]
    rows = blocks_overlapping((spans[0][0], spans[-1][1]), qb)  # query blocks holding any sentence
    first_row, last_row = rows.start, rows.stop - 1
    for block_ids, scores, _ in kept_scores_by_chunk(
        pattern.query[batch: batch + 1], pattern.key[batch: batch + 1], indices,
        query_block=qb, key_block=kb, scale=pattern.scale,
    ):
        if int(block_ids[-1]) < first_row or int(block_ids[0]) > last_row:
            continue
        probs = probs_from_lse(scores, lse_blocks[:, :, block_ids])[0].cpu()  # float32 [h, c, qb, top_k, kb]
        block_ids = block_ids.cpu()
        slots = indices[0][:, block_ids].cpu()  # [h, c, top_k]
        used = slots >= 0
        key_blocks = slots.clamp(min=0)
        # Which local sentence each query / key token belongs to (one-hot over the block's overlaps).
        q_pos = block_ids[:, None, None] * qb + torch.arange(qb)[None, :, None]  # [c, qb, 1]
        q_hot = ((q_pos >= q_first[block_ids][:, None, :]) & (q_pos < q_end[block_ids][:, None, :])).float()
        k_pos = key_blocks[..., None, None] * kb + torch.arange(kb)[:, None]  # [h, c, top_k, kb, 1]
        k_hot = ((k_pos >= k_first[key_blocks][..., None, :]) & (k_pos < k_end[key_blocks][..., None, :])).float()
        per_receiver = torch.einsum("cqm,hcqkx->hcmkx", q_hot, probs)
        value = torch.einsum("hcmkx,hckxs->hckms", per_receiver, k_hot)
        source = torch.where(used[..., None], k_ids[key_blocks], -1)
        yield value, q_ids[block_ids][None, :, None, :, None], source[..., None, :]


def _cells(pattern: BlockSparsePattern, spans: Sequence[Span], batch: int, token_level: bool):
    if token_level:
        return _kept_token_sentence_cells(pattern, spans, batch)
    return _sparse_sentence_cells(pattern, spans, batch)


def accumulate_sentence_attention(
    pattern: BlockSparsePattern, spans: Sequence[Span], batch: int, token_level: bool, proximity: int | None
) -> Tensor:
    """Sum the kept cells into [head, n, n] sentence-pair means (``proximity=None``) or, without
    the matrix, into [head, n] sums over receivers ``i >= j + proximity`` of those means."""
    n = len(spans)
    n_heads = pattern.block_indices.shape[1]
    sizes = sentence_sizes(spans).float()
    out = torch.zeros(n_heads * n * (n if proximity is None else 1), dtype=torch.float64)
    head = torch.arange(n_heads)[:, None, None, None, None]
    for value, receiver, source in _cells(pattern, spans, batch, token_level):
        valid = (receiver >= 0) & (source >= 0)
        if proximity is not None:
            valid = valid & (receiver - source >= proximity)
        receiver, source = receiver.clamp(min=0), source.clamp(min=0)
        value = torch.where(valid, value / (sizes[receiver] * sizes[source]), 0.0)
        index = head * n + source if proximity is not None else (head * n + receiver) * n + source
        out.index_add_(0, index.expand_as(value).reshape(-1), value.reshape(-1).double())
    return out.view(n_heads, n, n) if proximity is None else out.view(n_heads, n)
