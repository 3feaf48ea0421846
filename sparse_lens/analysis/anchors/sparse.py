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
``sparse_lens.analysis.anchors.salience``: long traces have thousands of sentences; from
``block_mass`` in factored form, linear in T). The work runs on the pattern's device (the GPU for
a model's cached patterns), in chunks of bounded scratch; results come back on the CPU.
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
    return torch.where(valid, ramp + full, 0)


def _block_sentence_overlaps(spans: Sequence[Span], n_blocks: int, block: int, seq_len: int, device=None):
    """For each block: the sentences it overlaps, as [n_blocks, m] sentence ids (-1 padded) and the
    overlapping token ranges [n_blocks, m] (start, end), on ``device``."""
    starts = torch.tensor([a for a, _ in spans], device=device)
    ends = torch.tensor([b for _, b in spans], device=device)
    block_first = torch.arange(n_blocks, device=device) * block
    block_end = (block_first + block).clamp(max=seq_len)
    lo = torch.searchsorted(ends, block_first, right=True)  # first sentence ending after the block starts
    hi = torch.searchsorted(starts, block_end, right=False)  # first sentence starting at or after its end
    width = max(1, int((hi - lo).max()))
    ids = lo[:, None] + torch.arange(width, device=device)[None, :]
    valid = ids < hi[:, None]
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    safe = ids.clamp(min=0, max=len(spans) - 1)
    first = torch.maximum(starts[safe], block_first[:, None])
    end = torch.minimum(ends[safe], block_end[:, None])
    end = torch.where(valid, end, first)
    return ids, first, end


def _chunk_elements(device: torch.device) -> int:
    """Kept cells x sentence pairs per chunk (a few temporaries of that many 4-8 byte elements):
    2M on the CPU (cache-friendly), 16M on an accelerator (fewer launches, ~1 GB of scratch)."""
    return 2**21 if device.type == "cpu" else 2**24


def _row_chunks(pattern: BlockSparsePattern, elements_per_row: int):
    """Row indices (query blocks held by the pattern) in chunks of about ``_chunk_elements``."""
    device, n_rows = pattern.block_indices.device, pattern.block_indices.shape[-2]
    step = max(1, _chunk_elements(device) // max(1, elements_per_row))
    for row0 in range(0, n_rows, step):
        yield torch.arange(row0, min(row0 + step, n_rows), device=device)


def _kept_cells(pattern: BlockSparsePattern, batch: int, rows: Tensor):
    """The kept cells of ``rows``: ``(blocks, key_blocks, used, share, diagonal)``.

    ``blocks``: [r] query block ids; ``key_blocks``: [head, r, top_k] key block ids (unused slots
    read 0), ``used``: which slots hold a block; ``share``: float32 [head, r, top_k], the cell's
    mass ``block_mass x n_queries`` per causal token pair in it (0 for unused slots);
    ``diagonal``: the (head, row, slot) indices of the used cells whose key block reaches the
    query block (not every token pair causal; about one per row)."""
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    kept = pattern.block_indices[batch][:, rows].long()  # [h, r, k]
    used = kept >= 0
    blocks = rows + pattern.first_query_block
    key_blocks = kept.clamp(min=0)
    q_lo = blocks * qb
    q_size = ((q_lo + qb).clamp(max=seq_len) - q_lo)[None, :, None]
    k_lo = key_blocks * kb
    cell = q_size * ((k_lo + kb).clamp(max=seq_len) - k_lo)  # every pair causal, off the diagonal
    diagonal = (used & (k_lo + kb > q_lo[None, :, None])).nonzero(as_tuple=True)
    hd, rd, kd = diagonal
    cell[diagonal] = _causal_pairs(q_lo[rd], q_lo[rd] + q_size[0, rd, 0], k_lo[diagonal],
                                   (k_lo[diagonal] + kb).clamp(max=seq_len))
    total = pattern.block_mass[batch][:, rows].detach().float() * q_size  # probability summed over queries
    share = torch.where(used, total / cell.clamp(min=1).float(), 0.0)
    return blocks, key_blocks, used, share, diagonal


def _sparse_sentence_cells(pattern: BlockSparsePattern, spans: Sequence[Span], batch: int):
    """Yield ``(value, receiver, source)`` per chunk of query blocks, from ``block_mass`` only, on
    the pattern's device.

    ``value``: float32 [head, rows, top_k, mq, mk], the mass each kept cell gives to the pair
    (the mq sentences overlapping its query block) x (the mk sentences overlapping its key
    block), shared in proportion to causal token pairs; ``receiver``: sentence ids [1, rows, 1,
    mq, 1] and ``source``: [head, rows, top_k, 1, mk], -1 where no sentence.
    """
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    device = pattern.block_indices.device
    q_ids, q_first, q_end = _block_sentence_overlaps(spans, num_blocks(seq_len, qb), qb, seq_len, device)
    k_ids, k_first, k_end = _block_sentence_overlaps(spans, num_blocks(seq_len, kb), kb, seq_len, device)
    q_len, k_len = (q_end - q_first).float(), (k_end - k_first).float()
    n_heads, _, top_k = pattern.block_indices[batch].shape
    for rows in _row_chunks(pattern, n_heads * top_k * q_ids.shape[1] * k_ids.shape[1]):
        blocks, key_blocks, used, share, diagonal = _kept_cells(pattern, batch, rows)
        if not bool((q_ids[blocks] >= 0).any()):
            continue
        # Off the diagonal every (query, key) pair of a cell is causal: causal pairs = overlap products.
        pairs = q_len[blocks][None, :, None, :, None] * k_len[key_blocks][..., None, :]
        hd, rd, kd = diagonal
        kbd, bd = key_blocks[diagonal], blocks[rd]
        pairs[diagonal] = _causal_pairs(
            q_first[bd][:, :, None], q_end[bd][:, :, None], k_first[kbd][:, None, :], k_end[kbd][:, None, :]
        ).float()
        source = torch.where(used[..., None], k_ids[key_blocks], -1)
        yield share[..., None, None] * pairs, q_ids[blocks][None, :, None, :, None], source[..., None, :]


def _vertical_sums_from_block_mass(
    pattern: BlockSparsePattern, spans: Sequence[Span], batch: int, proximity: int
) -> Float[Tensor, "head n"]:
    """``accumulate_sentence_attention(pattern, spans, batch, False, proximity)``: float64 [head,
    n] sums over receivers ``i >= j + proximity`` of the block-mass sentence means, factored to
    O(kept cells x sentences per key block) time and scratch (not x sentences per query block
    too), on the pattern's device, returned on the CPU.

    Off the diagonal every token pair of a cell is causal, so source sentence ``j`` receives
    ``share x overlap_j / |S_j| x sum_{i >= j + proximity} overlap_i / |S_i|`` from a cell
    (``share``: the cell's mass per token pair; ``overlap``: tokens in the query / key block), the
    sum running over the query block's sentences, whose ids are consecutive: a suffix sum, looked
    up. The few cells reaching the diagonal (about one per row) go sentence pair by pair.
    """
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    device = pattern.block_indices.device
    n, (n_heads, _, top_k) = len(spans), pattern.block_indices[batch].shape
    q_ids, q_first, q_end = _block_sentence_overlaps(spans, num_blocks(seq_len, qb), qb, seq_len, device)
    k_ids, k_first, k_end = _block_sentence_overlaps(spans, num_blocks(seq_len, kb), kb, seq_len, device)
    inverse_size = (1.0 / sentence_sizes(spans)).to(device)  # float64 [n]
    q_weight = (q_end - q_first) * _per_sentence(inverse_size, q_ids)  # overlap_i / |S_i|, [n_query_blocks, mq]
    k_weight = (k_end - k_first) * _per_sentence(inverse_size, k_ids)  # overlap_j / |S_j|, [n_key_blocks, mk]
    # received[b, a]: sum of q_weight[b, a:], over the query block's sentences from its a-th on (0 for a = mq).
    received = torch.nn.functional.pad(q_weight.flip(-1).cumsum(-1).flip(-1), (0, 1))
    first_sentence = q_ids[:, 0]  # [n_query_blocks]; -1 if none (its received row is all 0)
    head = torch.arange(n_heads, device=device)[:, None, None, None]
    out = torch.zeros(n_heads * n, dtype=torch.float64, device=device)
    for rows in _row_chunks(pattern, n_heads * top_k * k_ids.shape[1]):
        blocks, key_blocks, _, share, diagonal = _kept_cells(pattern, batch, rows)
        off_diagonal_share = share.index_put(diagonal, share.new_zeros(()))[..., None]
        source = k_ids[key_blocks]  # [h, r, k, mk]
        first_receiver = (source + proximity - first_sentence[blocks][None, :, None, None]).clamp(0, q_ids.shape[1])
        value = off_diagonal_share * k_weight[key_blocks] * received[blocks[None, :, None, None], first_receiver]
        out.index_add_(0, (head * n + source.clamp(min=0)).flatten(), value.flatten())
        # Cells reaching the diagonal: causal token pairs per (receiver, source) sentence pair.
        hd, rd, _ = diagonal
        bd, kbd = blocks[rd], key_blocks[diagonal]
        receiver, source = q_ids[bd][:, :, None], k_ids[kbd][:, None, :]  # [d, mq, 1], [d, 1, mk]
        pairs = _causal_pairs(q_first[bd][:, :, None], q_end[bd][:, :, None],
                              k_first[kbd][:, None, :], k_end[kbd][:, None, :])
        value = pairs * share[diagonal][:, None, None].double() * _per_sentence(inverse_size, receiver)
        value = torch.where(source <= receiver - proximity, value, 0.0).sum(1)  # over receivers: [d, mk]
        value = value * _per_sentence(inverse_size, source[:, 0])
        out.index_add_(0, (hd[:, None] * n + source[:, 0].clamp(min=0)).flatten(), value.flatten())
    return out.view(n_heads, n).cpu()


def _per_sentence(values: Tensor, ids: Tensor) -> Tensor:
    """``values[ids]``, 0 where ``ids`` is -1 (no sentence)."""
    return torch.where(ids >= 0, values[ids.clamp(min=0)], 0.0)


def _kept_token_sentence_cells(pattern: BlockSparsePattern, spans: Sequence[Span], batch: int):
    """As ``_sparse_sentence_cells``, but each kept cell's mass is split by its exact token
    probabilities ``exp(q.k * scale - lse)``, recomputed from the pattern's rotated q/k (time
    O(kept pairs), like the sparse attention itself), on the pattern's device."""
    if pattern.query is None or pattern.key is None:
        raise ValueError("Token-level sparse aggregation needs the pattern's queries/keys (TracingConfig.keep_qk=True).")
    if pattern.is_sliced:
        raise ValueError("Token-level sparse aggregation needs the whole pattern; this one was sliced along queries.")
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    device = pattern.block_indices.device
    q_ids, q_first, q_end = _block_sentence_overlaps(spans, num_blocks(seq_len, qb), qb, seq_len, device)
    k_ids, k_first, k_end = _block_sentence_overlaps(spans, num_blocks(seq_len, kb), kb, seq_len, device)
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
        probs = probs_from_lse(scores, lse_blocks[:, :, block_ids])[0].float()  # [h, c, qb, top_k, kb]
        slots = indices[0][:, block_ids].long()  # [h, c, top_k]
        used = slots >= 0
        key_blocks = slots.clamp(min=0)
        # Which local sentence each query / key token belongs to (one-hot over the block's overlaps).
        q_pos = block_ids[:, None, None] * qb + torch.arange(qb, device=device)[None, :, None]  # [c, qb, 1]
        q_hot = ((q_pos >= q_first[block_ids][:, None, :]) & (q_pos < q_end[block_ids][:, None, :])).float()
        k_pos = key_blocks[..., None, None] * kb + torch.arange(kb, device=device)[:, None]  # [h, c, top_k, kb, 1]
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
    the matrix, into [head, n] sums over receivers ``i >= j + proximity`` of those means
    (from ``block_mass``: ``_vertical_sums_from_block_mass``).

    Computed on the pattern's device in O(kept cells x sentence pairs per cell) time, in chunks
    of bounded scratch; returned as float64 on the CPU (layers spread over devices stack)."""
    if proximity is not None and not token_level:
        return _vertical_sums_from_block_mass(pattern, spans, batch, proximity)
    n = len(spans)
    device = pattern.block_indices.device
    n_heads = pattern.block_indices.shape[-3]
    inverse_size = (1.0 / sentence_sizes(spans)).float().to(device)  # [n]
    head = torch.arange(n_heads, device=device)[:, None, None, None]
    out = torch.zeros(n_heads * n * (n if proximity is None else 1), dtype=torch.float64, device=device)
    for value, receiver, source in _cells(pattern, spans, batch, token_level):
        # value [h, r, k, mq, mk], receiver [1, r, 1, mq, 1], source [h, r, k, 1, mk]; -1: no sentence
        receiver_weight, source_weight = _per_sentence(inverse_size, receiver), _per_sentence(inverse_size, source)
        receiver, source = receiver.clamp(min=0), source.clamp(min=0)
        if proximity is None:
            value = value * receiver_weight * source_weight
            index = (head[..., None] * n + receiver) * n + source
            out.index_add_(0, index.expand_as(value).reshape(-1), value.reshape(-1).double())
            continue
        # Sum over the receivers first (the index depends on the source only).
        value = torch.where(source <= receiver - proximity, value * receiver_weight, 0.0).sum(-2)
        value = value * source_weight[..., 0, :]  # [h, r, k, mk]
        out.index_add_(0, (head * n + source[..., 0, :]).reshape(-1), value.reshape(-1).double())
    out = out.cpu()
    return out.view(n_heads, n, n) if proximity is None else out.view(n_heads, n)
