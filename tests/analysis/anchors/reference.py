"""Brute-force references for the thought-anchor tests: the paper's definitions token by token,
and the tiny-model traces they are checked on."""

from __future__ import annotations

import numpy as np
import torch

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, BLOCK = 256, 8


def brute_sentence_matrix(probs: np.ndarray, spans) -> np.ndarray:
    """The paper's definition, literally: mean of the token attention weights in each block."""
    n = len(spans)
    out = np.zeros((probs.shape[0], n, n))
    for i, (a, b) in enumerate(spans):
        for j, (c, d) in enumerate(spans):
            out[:, i, j] = probs[:, a:b, c:d].mean(axis=(1, 2))
    return out


def brute_block_approximation(probs: np.ndarray, spans, block_indices: np.ndarray, block: int) -> np.ndarray:
    """The documented sparse approximation, token by token: each kept cell's dense mass is shared
    among sentence pairs in proportion to their causal (k <= q) token pairs in the cell."""
    n_heads, seq = probs.shape[0], probs.shape[-1]
    sentence_of = np.full(seq, -1)
    for index, (a, b) in enumerate(spans):
        sentence_of[a:b] = index
    sizes = np.array([b - a for a, b in spans], dtype=float)
    totals = np.zeros((n_heads, len(spans), len(spans)))
    for head in range(n_heads):
        for row in range(block_indices.shape[1]):
            queries = np.arange(row * block, min((row + 1) * block, seq))
            for key_block in block_indices[head, row]:
                if key_block < 0:
                    continue
                keys = np.arange(key_block * block, min((key_block + 1) * block, seq))
                causal = keys[None, :] <= queries[:, None]
                mass = probs[head][np.ix_(queries, keys)].sum()
                pair_counts = np.zeros((len(spans), len(spans)))
                for qi, q in enumerate(queries):
                    for ki, k in enumerate(keys):
                        if causal[qi, ki] and sentence_of[q] >= 0 and sentence_of[k] >= 0:
                            pair_counts[sentence_of[q], sentence_of[k]] += 1
                totals[head] += mass * pair_counts / causal.sum()
    return totals / (sizes[:, None] * sizes[None, :])


def brute_vertical(matrix: np.ndarray, proximity: int = 4) -> np.ndarray:
    n = matrix.shape[-1]
    scores = np.full(n, np.nan)
    for j in range(n):
        values = [matrix[i, j] for i in range(j + proximity, n)]
        if values:
            scores[j] = sum(values) / len(values)
    return scores


def brute_kurtosis(values: np.ndarray) -> float:
    x = values[~np.isnan(values)]
    m = x.mean()
    m2, m4 = ((x - m) ** 2).mean(), ((x - m) ** 4).mean()
    return m4 / m2**2 - 3.0


def spans_from_lengths(first: int, lengths) -> list[tuple[int, int]]:
    spans, start = [], first
    for length in lengths:
        spans.append((start, start + length))
        start += length
    return spans


def tiny_traces():
    """Observe-mode patterns of a tiny model at two budgets (everything kept, top_k 6) and the dense
    bridge's token-level patterns: ``(traces, probs)``, ``traces[top_k]`` one pattern per layer."""
    full = sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=SEQ // BLOCK)
    sparse, dense = sparse_and_dense(tiny_llama_config(), full)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, dense_cache = dense.run_with_cache(tokens)
        traces = {}
        for top_k in (SEQ // BLOCK, 6):
            with sparse.stream_settings(mode="observe", top_k=top_k):
                _, cache = sparse.run_with_cache(tokens)
            traces[top_k] = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(2)]
    probs = [dense_cache[f"blocks.{layer}.attn.hook_pattern"][0].double() for layer in range(2)]
    return traces, probs


ALIGNED = spans_from_lengths(8, [8, 16, 24, 8, 16, 8, 8, 24, 16, 8, 32, 8, 16, 24, 8, 16, 8])  # block multiples
UNALIGNED = spans_from_lengths(5, [7, 13, 21, 5, 11, 9, 17, 3, 25, 12, 19, 6, 14, 30, 9, 18, 10, 11])
