"""Dense reference sentence attention (step 1 of the method, exactly).

- ``sentence_attention_from_probs``: from token-level probabilities (a dense bridge's
  ``hook_pattern``, or ``BlockSparsePattern.token_probs()``) for short inputs: the brute-force
  definition ``M[i, j] = 1 / (|S_i| |S_j|) * sum_{q in S_i} sum_{k in S_j} A[q, k]``.
- ``sentence_attention_dense``: exact dense attention recomputed from an observe-mode pattern's
  rotated ``query``/``key`` and its dense ``lse`` in query chunks: quadratic time, O(T x chunk)
  memory, never a T x T tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from sparse_lens.analysis.anchors.sentences import Span, check_sentence_spans, sentence_one_hot, sentence_ids, sentence_sizes
from sparse_lens.pattern import BlockSparsePattern


def sentence_attention_from_probs(
    probs: Float[Tensor, "... seq seq"], spans: Sequence[Span]
) -> Float[Tensor, "... n n"]:
    """The paper's matrix from token-level attention probabilities (short inputs: a dense bridge's
    ``hook_pattern`` or ``BlockSparsePattern.token_probs()``): ``M[i, j]`` = mean of ``probs`` over
    the block (queries of sentence i) x (keys of sentence j)."""
    spans = check_sentence_spans(spans, probs.shape[-1])
    one_hot = sentence_one_hot(sentence_ids(spans, probs.shape[-1], device=probs.device), len(spans)).double()
    totals = one_hot.T @ probs.double() @ one_hot
    sizes = sentence_sizes(spans).to(probs.device)
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
        raise ValueError("This pattern kept no queries/keys (TracingConfig.keep_qk=False).")
    seq_len = pattern.seq_len
    spans = check_sentence_spans(spans, seq_len)
    n = len(spans)
    query, key, lse = pattern.query[batch].float(), pattern.key[batch].float(), pattern.lse[batch].float()
    n_heads, group = query.shape[0], query.shape[0] // key.shape[0]
    key = key.repeat_interleave(group, dim=0)
    ids = sentence_ids(spans, seq_len, device=query.device)
    first, last = spans[0][0], spans[-1][1]
    totals = torch.zeros(n_heads, n, n, dtype=torch.float64, device=query.device)
    key_one_hot = sentence_one_hot(ids[:last], n)
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
    sizes = sentence_sizes(spans).to(query.device)
    return (totals / (sizes[:, None] * sizes[None, :])).float().cpu()
