"""Thought anchors (Bogdan, Macar, Nanda, Conmy 2025, arXiv 2506.19143), dense and sparse.

The paper's white-box "receiver heads" method, on a chain of thought cut into sentences:

1. **Sentence attention.** Per layer and head, a sentence x sentence matrix ``M`` whose entry
   ``M[i, j]`` is the *average of the token attention weights in the block* of receiving
   sentence ``i`` (queries) and source sentence ``j`` (keys)::

       M[i, j] = 1 / (|S_i| |S_j|) * sum_{q in S_i} sum_{k in S_j} A[q, k]

   (the paper's ``region.mean()``; equivalently the mean over ``S_i``'s queries of the
   attention summed over ``S_j``'s keys, divided by ``|S_j|``). Tokens outside every sentence
   (the prompt, the chat template) are ignored.
2. **Vertical score** of sentence ``j``: the mean of ``M[i, j]`` over the receiving sentences
   ``i >= j + proximity`` (``proximity = 4``: the upper triangle and the band of the 3 nearest
   earlier sentences are ignored). The last ``proximity`` sentences have no score (NaN).
3. **Receiver heads**: the ``top_heads = 20`` heads with the largest (Fisher, biased, like
   ``scipy.stats.kurtosis`` defaults) kurtosis of their vertical scores over sentences.
4. **Salience** of sentence ``j``: its vertical score averaged over the receiver heads. The
   thought anchors are the most salient sentences.

Three ways to get step 1 here:

- ``sentence_attention_from_probs``: from token-level probabilities (a dense bridge's
  ``hook_pattern``, or ``BlockSparsePattern.to_dense()``) for short inputs: the brute-force
  definition.
- ``sentence_attention_dense``: exact dense attention recomputed from an observe-mode pattern's
  rotated ``query``/``key`` and its dense ``lse`` in query chunks: quadratic time, O(T x chunk)
  memory, never a T x T tensor.
- ``sentence_attention_sparse``: from the kept blocks only (``block_indices``/``block_mass``),
  O(T / block x top_k) per head. **Approximation**: each kept (query block, key block) cell's
  total mass ``block_mass x n_queries`` is shared among the sentence pairs overlapping the
  cell in proportion to the number of causal token pairs ``(q, k), k <= q`` each sentence pair
  has in the cell (off the diagonal: the product of the token overlaps), i.e. attention is
  treated as uniform inside a cell. Mass in pruned cells counts as 0. When every sentence
  boundary falls on a block boundary and nothing is pruned, the result is exact.
- ``sentence_attention_sparse(..., token_level=True)``: the kept cells only, but each split by
  its exact token weights ``exp(q.k * scale - lse)`` recomputed from the pattern's rotated q/k
  (``keep_qk=True``), in time O(kept pairs) like the sparse attention itself. Pruned cells count
  as 0, so in observe mode every entry is a lower bound of the dense one, and the result is
  exact whenever nothing is pruned, aligned or not.

The sparse vertical scores (``vertical_scores_sparse``) are accumulated straight from the kept
cells, so no sentence x sentence matrix is needed either (long traces have thousands of
sentences).

How close is sparse to dense? On a 1,297-token chain of thought (60 sentences) on SmolLM2-135M
(tests/analysis/test_thought_anchors.py), Spearman of the salience / receiver heads shared of 20:
uniform-in-cell ``block_mass`` at 16-token blocks reaches only 0.86 / 10 even with nothing pruned
(0.62 / 0 at top_k 16, 65% pruned), because a cell's mass is not uniform (sentence-final tokens
draw much of it); at 8-token blocks, top_k 32 (65% pruned) it reaches 0.95 / 13. Token-level
weights of the kept cells reach 0.97 / 19 at 16-token blocks, top_k 32 (37% pruned) and 0.99 / 18
at 8-token blocks, top_k 32. At 16-token blocks, top_k 16 (65% pruned) the gap is mostly the
estimator's misses: token-level weights give 0.90 / 8 with the Stream estimate and 0.99 / 19 with
the exact top-16 blocks by dense mass.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.kernels.sparse_attention_ref import _kept_scores_by_chunk, _probs
from sparse_lens.pattern import BlockSparsePattern

PROXIMITY = 4
TOP_HEADS = 20

Span = tuple[int, int]

# A sentence ends after a run of . ! ? (and closing quotes/brackets) followed by whitespace, or at
# a newline. "3.5" or "e.g.x" do not end one (no whitespace after the point).
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|\n")


# ----- sentences ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sentences:
    """Sentences of a text and the token span ``[start, end)`` each occupies in a token sequence."""

    texts: tuple[str, ...]
    char_spans: tuple[Span, ...]
    token_spans: tuple[Span, ...]

    def __len__(self) -> int:
        return len(self.token_spans)

    def __iter__(self) -> Iterator[Span]:
        return iter(self.token_spans)

    def __getitem__(self, index: int) -> Span:
        return self.token_spans[index]


def sentence_char_spans(text: str, char_range: Span | None = None) -> list[Span]:
    """Character spans of the sentences of ``text[char_range]`` (regex splitter: ``.``, ``!``,
    ``?`` followed by whitespace, and newlines). Spans exclude surrounding whitespace."""
    start, end = char_range or (0, len(text))
    spans, cursor = [], start
    for match in _SENTENCE_END.finditer(text, start, end):
        spans.append((cursor, match.end()))
        cursor = match.end()
    spans.append((cursor, end))
    stripped = []
    for a, b in spans:
        piece = text[a:b]
        a, b = a + len(piece) - len(piece.lstrip()), b - (len(piece) - len(piece.rstrip()))
        if b > a:
            stripped.append((a, b))
    return stripped


def split_sentences(
    text: str,
    tokenizer: Any = None,
    *,
    offsets: Sequence[Span] | None = None,
    char_range: Span | None = None,
    token_offset: int = 0,
) -> Sentences:
    """Cut ``text`` (or ``text[char_range]``) into sentences and map them onto tokens.

    Token positions come from ``offsets`` (one ``(char_start, char_end)`` per token of ``text``,
    as a fast tokenizer's ``return_offsets_mapping`` gives), or from ``tokenizer`` (called on
    ``text`` without special tokens). A token belongs to the sentence holding its first
    non-whitespace character; whitespace between sentences goes with the preceding one.
    Sentences that receive no token (a token spanning two sentences) merge into the previous one.
    ``token_offset`` shifts every token span (e.g. 1 when the model prepends a BOS token).
    """
    if offsets is None:
        if tokenizer is None:
            raise ValueError("split_sentences needs a tokenizer or the tokens' character offsets.")
        offsets = _token_offsets(text, tokenizer)
    char_spans = sentence_char_spans(text, char_range)
    if not char_spans:
        return Sentences((), (), ())
    starts = [a for a, _ in char_spans]
    range_start, range_end = char_range or (0, len(text))
    token_sentence = []
    for a, b in offsets:
        piece = text[a:b]
        position = a + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)
        if position < range_start or position >= range_end or b <= a:
            token_sentence.append(-1)
        else:
            token_sentence.append(max(0, bisect.bisect_right(starts, position) - 1))
    first_token: dict[int, int] = {}
    last_token: dict[int, int] = {}
    for index, sentence in enumerate(token_sentence):
        if sentence >= 0:
            first_token.setdefault(sentence, index)
            last_token[sentence] = index
    texts, chars, tokens = [], [], []
    for sentence, (a, b) in enumerate(char_spans):
        if sentence not in first_token:
            if texts:  # merge into the previous sentence
                chars[-1] = (chars[-1][0], b)
                texts[-1] = text[chars[-1][0]:b]
            continue
        texts.append(text[a:b])
        chars.append((a, b))
        tokens.append((first_token[sentence] + token_offset, last_token[sentence] + 1 + token_offset))
    return Sentences(tuple(texts), tuple(chars), tuple(tokens))


def _token_offsets(text: str, tokenizer: Any) -> list[Span]:
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(pair) for pair in encoded["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError, ValueError):  # slow tokenizer: decode prefixes
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        offsets, cursor = [], 0
        for index in range(len(ids)):
            end = len(tokenizer.decode(ids[: index + 1]))
            offsets.append((cursor, max(cursor, min(end, len(text)))))
            cursor = offsets[-1][1]
        return offsets


def _check_spans(spans: Sequence[Span], seq_len: int) -> list[Span]:
    spans = [(int(a), int(b)) for a, b in spans]
    previous_end = 0
    for a, b in spans:
        if not 0 <= a < b <= seq_len or a < previous_end:
            raise ValueError(f"Sentence spans must be non-empty, ascending, disjoint and inside [0, {seq_len}); got {spans}.")
        previous_end = b
    if not spans:
        raise ValueError("No sentences.")
    return spans


def _sentence_ids(spans: Sequence[Span], seq_len: int, device=None) -> Tensor:
    ids = torch.full((seq_len,), -1, dtype=torch.int64, device=device)
    for index, (a, b) in enumerate(spans):
        ids[a:b] = index
    return ids


def _one_hot(ids: Tensor, n: int) -> Tensor:
    """[len(ids), n] float32 indicator of each position's sentence (all zero outside sentences)."""
    return torch.nn.functional.one_hot(ids.clamp(min=0), n).float() * (ids >= 0)[:, None]


def _sizes(spans: Sequence[Span]) -> Tensor:
    return torch.tensor([b - a for a, b in spans], dtype=torch.float64)


# ----- sentence x sentence attention ----------------------------------------------------------
def sentence_attention_from_probs(
    probs: Float[Tensor, "... seq seq"], spans: Sequence[Span]
) -> Float[Tensor, "... n n"]:
    """The paper's matrix from token-level attention probabilities (short inputs: a dense bridge's
    ``hook_pattern`` or ``BlockSparsePattern.to_dense()``): ``M[i, j]`` = mean of ``probs`` over
    the block (queries of sentence i) x (keys of sentence j)."""
    spans = _check_spans(spans, probs.shape[-1])
    one_hot = _one_hot(_sentence_ids(spans, probs.shape[-1], device=probs.device), len(spans)).double()
    totals = one_hot.T @ probs.double() @ one_hot
    sizes = _sizes(spans).to(probs.device)
    return (totals / (sizes[:, None] * sizes[None, :])).float()


@torch.no_grad()
def sentence_attention_dense(
    pattern: BlockSparsePattern, spans: Sequence[Span], *, batch: int = 0, query_chunk: int = 256
) -> Float[Tensor, "head n n"]:
    """Exact dense sentence attention of one layer, recomputed from an observe-mode pattern's
    rotated queries, keys and dense ``lse`` (``keep_qk=True``), ``query_chunk`` queries at a time:
    quadratic time, O(T x query_chunk) memory per head, no T x T tensor."""
    if pattern.mode != "observe":
        raise ValueError("Dense sentence attention needs an observe-mode pattern (its lse is the dense normaliser).")
    if pattern.query is None or pattern.key is None:
        raise ValueError("This pattern kept no queries/keys (StreamConfig.keep_qk=False).")
    seq_len = pattern.seq_len
    spans = _check_spans(spans, seq_len)
    n = len(spans)
    query, key, lse = pattern.query[batch].float(), pattern.key[batch].float(), pattern.lse[batch].float()
    n_heads, group = query.shape[0], query.shape[0] // key.shape[0]
    key = key.repeat_interleave(group, dim=0)
    ids = _sentence_ids(spans, seq_len, device=query.device)
    first, last = spans[0][0], spans[-1][1]
    totals = torch.zeros(n_heads, n, n, dtype=torch.float64, device=query.device)
    key_one_hot = _one_hot(ids[:last], n)
    for row in range(first, last, query_chunk):
        rows = torch.arange(row, min(row + query_chunk, last), device=query.device)
        row_ids = ids[rows]
        if bool((row_ids < 0).all()):
            continue
        n_keys = int(rows[-1]) + 1
        scores = torch.einsum("hqd,hkd->hqk", query[:, rows], key[:, :n_keys]) * pattern.scale
        causal = torch.arange(n_keys, device=query.device)[None, :] <= rows[:, None]
        probs = torch.exp(scores - lse[:, rows, None]).masked_fill(~causal, 0.0)
        per_sentence = probs @ key_one_hot[:n_keys]  # [head, rows, n]
        keep = row_ids >= 0
        totals.index_add_(1, row_ids[keep], per_sentence[:, keep].double())
    sizes = _sizes(spans).to(query.device)
    return (totals / (sizes[:, None] * sizes[None, :])).float().cpu()


def sentence_attention_sparse(
    pattern: BlockSparsePattern, spans: Sequence[Span], *, batch: int = 0, token_level: bool = False
) -> Float[Tensor, "head n n"]:
    """Sentence attention of one layer from the kept blocks only (see the module docstring for
    the approximation; ``token_level=True``: exact token probabilities of the kept cells, from the
    pattern's q/k). Materialises [head, n, n]; ``vertical_scores_sparse`` avoids it. A pattern
    sliced along queries contributes the rows it holds only."""
    spans = _check_spans(spans, pattern.seq_len)
    return _accumulate(pattern, spans, batch, token_level, proximity=None).float()


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
        raise ValueError("Token-level sparse aggregation needs the pattern's queries/keys (StreamConfig.keep_qk=True).")
    if pattern.is_sliced:
        raise ValueError("Token-level sparse aggregation needs the whole pattern; this one was sliced along queries.")
    seq_len, qb, kb = pattern.seq_len, pattern.query_block, pattern.key_block
    q_ids, q_first, q_end = _block_sentence_overlaps(spans, num_blocks(seq_len, qb), qb, seq_len)
    k_ids, k_first, k_end = _block_sentence_overlaps(spans, num_blocks(seq_len, kb), kb, seq_len)
    lse = pattern.lse[batch: batch + 1].float()
    lse_blocks = torch.nn.functional.pad(lse, (0, num_blocks(seq_len, qb) * qb - seq_len)).unflatten(2, (-1, qb))
    indices = pattern.block_indices[batch: batch + 1]
    first_row, last_row = spans[0][0] // qb, (spans[-1][1] - 1) // qb
    for block_ids, scores, _ in _kept_scores_by_chunk(
        pattern.query[batch: batch + 1], pattern.key[batch: batch + 1], indices,
        query_block=qb, key_block=kb, scale=pattern.scale,
    ):
        if int(block_ids[-1]) < first_row or int(block_ids[0]) > last_row:
            continue
        probs = _probs(scores, lse_blocks[:, :, block_ids])[0].cpu()  # float32 [h, c, qb, top_k, kb]
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


def _accumulate(
    pattern: BlockSparsePattern, spans: Sequence[Span], batch: int, token_level: bool, proximity: int | None
) -> Tensor:
    """Sum the kept cells into [head, n, n] sentence-pair means (``proximity=None``) or, without
    the matrix, into [head, n] sums over receivers ``i >= j + proximity`` of those means."""
    n = len(spans)
    n_heads = pattern.block_indices.shape[1]
    sizes = _sizes(spans).float()
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


# ----- vertical scores, kurtosis, salience ----------------------------------------------------
def vertical_scores(matrices: Float[Tensor, "... n n"], proximity: int = PROXIMITY) -> Float[Tensor, "... n"]:
    """Vertical score of each source sentence j: mean of ``M[i, j]`` over ``i >= j + proximity``
    (NaN for the last ``proximity`` sentences, which have no such receiver)."""
    n = matrices.shape[-1]
    receiver = torch.arange(n)[:, None]
    source = torch.arange(n)[None, :]
    mask = (receiver - source >= proximity).to(matrices.device)
    count = mask.sum(0).to(matrices.dtype)
    sums = (matrices * mask).sum(-2)
    return torch.where(count > 0, sums / count.clamp(min=1), torch.full_like(sums, float("nan")))


def vertical_scores_sparse(
    pattern: BlockSparsePattern,
    spans: Sequence[Span],
    *,
    batch: int = 0,
    proximity: int = PROXIMITY,
    token_level: bool = False,
) -> Float[Tensor, "head n"]:
    """``vertical_scores(sentence_attention_sparse(...))`` without the [head, n, n] matrix:
    accumulated from the kept cells, O(kept cells x sentences per block) memory."""
    spans = _check_spans(spans, pattern.seq_len)
    n = len(spans)
    sums = _accumulate(pattern, spans, batch, token_level, proximity)
    count = (n - torch.arange(n) - proximity).clamp(min=0).double()
    return torch.where(count > 0, sums / count.clamp(min=1), float("nan")).float()


def fisher_kurtosis(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Excess (Fisher) kurtosis over the last axis, biased moments, NaNs omitted (as
    ``scipy.stats.kurtosis(..., fisher=True, bias=True, nan_policy="omit")``); NaN for a
    constant or empty row."""
    values = values.double()
    valid = ~torch.isnan(values)
    count = valid.sum(-1).double()
    filled = torch.where(valid, values, 0.0)
    mean = filled.sum(-1) / count.clamp(min=1)
    centred = torch.where(valid, values - mean[..., None], 0.0)
    m2 = (centred**2).sum(-1) / count.clamp(min=1)
    m4 = (centred**4).sum(-1) / count.clamp(min=1)
    kurt = m4 / m2**2 - 3.0
    return torch.where((count > 0) & (m2 > 0), kurt, float("nan")).float()


@dataclass(frozen=True)
class ThoughtAnchors:
    """Receiver heads and sentence salience of one chain of thought.

    Attributes:
        vertical_scores: [layer, head, sentence], NaN for the last ``proximity`` sentences.
        kurtosis: [layer, head], Fisher kurtosis of each head's vertical scores.
        receiver_heads: the ``top_heads`` (layer, head) pairs of largest kurtosis, largest first.
        salience: [sentence], mean vertical score over the receiver heads.
        method: ``"dense"`` or ``"sparse"``.
    """

    vertical_scores: Float[Tensor, "layer head sentence"]
    kurtosis: Float[Tensor, "layer head"]
    receiver_heads: tuple[tuple[int, int], ...]
    salience: Float[Tensor, "sentence"]
    proximity: int = PROXIMITY
    method: str = "sparse"

    @property
    def n_sentences(self) -> int:
        return self.salience.shape[0]

    def anchors(self, k: int = 5) -> list[int]:
        """The ``k`` most salient sentences (indices, most salient first; scored sentences only)."""
        order = [int(i) for i in torch.argsort(torch.nan_to_num(self.salience, nan=-float("inf")), descending=True)]
        return [i for i in order if not torch.isnan(self.salience[i])][:k]

    def summary(self, sentences: Sequence[str] | None = None, k: int = 5) -> str:
        lines = [f"Thought anchors ({self.method}): {self.n_sentences} sentences, top receiver heads "
                 + ", ".join(f"L{layer}H{head}" for layer, head in self.receiver_heads[:8])
                 + (" ..." if len(self.receiver_heads) > 8 else "")]
        for rank, index in enumerate(self.anchors(k), 1):
            text = f" {sentences[index][:80]!r}" if sentences is not None else ""
            lines.append(f"  {rank}. sentence {index} salience {float(self.salience[index]):.4g}{text}")
        return "\n".join(lines)


def anchors_from_vertical_scores(
    scores: Float[Tensor, "layer head sentence"],
    *,
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    method: str = "sparse",
    exclude_layers: Sequence[int] = (),
) -> ThoughtAnchors:
    """Steps 3-4 of the method: receiver heads by kurtosis, salience over them. Heads of
    ``exclude_layers`` are never receivers (some analyses skip layer 0)."""
    kurt = fisher_kurtosis(scores)
    ranking = torch.nan_to_num(kurt.double(), nan=-float("inf")).clone()
    for layer in exclude_layers:
        ranking[layer] = -float("inf")
    n_heads = scores.shape[1]
    order = torch.argsort(ranking.flatten(), descending=True, stable=True)
    order = [int(i) for i in order if ranking.flatten()[i] > -float("inf")][:top_heads]
    receivers = tuple((i // n_heads, i % n_heads) for i in order)
    if receivers:
        salience = torch.stack([scores[layer, head] for layer, head in receivers]).mean(0)
    else:
        salience = torch.full(scores.shape[-1:], float("nan"))
    return ThoughtAnchors(scores, kurt, receivers, salience, proximity, method)


def thought_anchors(
    patterns: Sequence[BlockSparsePattern],
    sentences: Sequence[Span] | Sentences,
    *,
    method: str = "sparse",
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    batch: int = 0,
    exclude_layers: Sequence[int] = (),
) -> ThoughtAnchors:
    """Thought anchors of a chain of thought from one pattern per layer.

    ``method="sparse"`` aggregates the kept blocks only (any mode; in observe mode the kept mass
    is dense mass, in sparse mode the renormalised sparse softmax). ``method="dense"`` recomputes
    exact dense attention from observe-mode patterns with ``keep_qk=True`` (quadratic time).
    """
    spans = list(sentences)
    if method in ("sparse", "sparse_tokens"):
        token_level = method == "sparse_tokens"
        scores = [vertical_scores_sparse(p, spans, batch=batch, proximity=proximity, token_level=token_level)
                  for p in patterns]
    elif method == "dense":
        scores = [vertical_scores(sentence_attention_dense(p, spans, batch=batch), proximity) for p in patterns]
    else:
        raise ValueError(f"method must be 'sparse', 'sparse_tokens' or 'dense', got {method!r}.")
    return anchors_from_vertical_scores(
        torch.stack(scores), top_heads=top_heads, proximity=proximity, method=method, exclude_layers=exclude_layers
    )


@torch.no_grad()
def observe_thought_anchors(
    model: Any,
    tokens: Tensor,
    sentences: Sequence[Span] | Sentences,
    *,
    methods: Sequence[str] = ("sparse", "dense"),
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    **stream_changes: Any,
) -> dict[str, ThoughtAnchors]:
    """One observe-mode run of ``model`` (a ``HookedSparseTransformer``: dense attention, the
    sparse estimate recorded; ``stream_changes`` e.g. ``query_block=16, key_block=16, top_k=16``)
    and its thought anchors by each of ``methods`` (``"sparse"``, ``"sparse_tokens"``, ``"dense"``).
    Compare them with ``compare_anchors(result["sparse"], result["dense"])``."""
    with model.stream_settings(**{**stream_changes, "mode": "observe", "keep_qk": True}):
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    return {method: thought_anchors(patterns, sentences, method=method, top_heads=top_heads, proximity=proximity)
            for method in methods}


# ----- agreement ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnchorAgreement:
    """How far two thought-anchor results agree (typically sparse against dense).

    ``spearman``: rank correlation of the saliences (sentences scored in both);
    ``receiver_overlap``: shared receiver heads / number of receiver heads;
    ``anchor_overlap``: shared top-``k`` anchors / k."""

    spearman: float
    receiver_overlap: float
    anchor_overlap: float
    shared_receivers: tuple[tuple[int, int], ...]
    shared_anchors: tuple[int, ...]
    k: int

    def __str__(self) -> str:
        return (f"Spearman {self.spearman:.3f}, receiver-head overlap {self.receiver_overlap:.2f} "
                f"({len(self.shared_receivers)} shared), top-{self.k} anchor overlap {self.anchor_overlap:.2f}")


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata`` default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start: stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman rank correlation over the entries finite in both (NaN if fewer than 2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    ra, rb = rank_average(a[keep]), rank_average(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def compare_anchors(a: ThoughtAnchors, b: ThoughtAnchors, k: int = 5) -> AnchorAgreement:
    """Agreement of two results over the same sentences (e.g. sparse ``a`` against dense ``b``)."""
    if a.n_sentences != b.n_sentences:
        raise ValueError(f"Different sentence counts: {a.n_sentences} and {b.n_sentences}.")
    shared_receivers = tuple(head for head in a.receiver_heads if head in set(b.receiver_heads))
    n_receivers = max(len(a.receiver_heads), len(b.receiver_heads), 1)
    top_a, top_b = a.anchors(k), b.anchors(k)
    shared_anchors = tuple(i for i in top_a if i in set(top_b))
    return AnchorAgreement(
        spearman=spearman(a.salience, b.salience),
        receiver_overlap=len(shared_receivers) / n_receivers,
        anchor_overlap=len(shared_anchors) / max(1, min(k, len(top_a), len(top_b))),
        shared_receivers=shared_receivers,
        shared_anchors=shared_anchors,
        k=k,
    )
