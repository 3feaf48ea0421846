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
   ``i >= j + proximity`` (``proximity = 4``). The last ``proximity`` sentences have no score (NaN).
3. **Receiver heads**: the ``top_heads = 20`` heads with the largest kurtosis of their vertical
   scores over sentences.
4. **Salience** of sentence ``j``: its vertical score averaged over the receiver heads. The
   thought anchors are the most salient sentences.

The implementation lives in ``sparse_lens.analysis.anchors``, whose modules each depend only on
those above them:

| module | what |
|---|---|
| ``sentences`` | splitting a text into sentences and mapping them onto token spans |
| ``dense`` | step 1 exactly: from token probabilities, or recomputed densely from an observe-mode pattern |
| ``sparse`` | step 1 from the kept blocks only: ``block_mass`` shared uniformly in a cell, or the kept cells' exact token weights |
| ``salience`` | steps 2-4: vertical scores (also straight from a sparse pattern), kurtosis, receiver heads, ``ThoughtAnchors``; ``thought_anchors`` and ``observe_thought_anchors`` |
| ``agreement`` | sparse against dense: Spearman of the saliences, shared receiver heads and anchors |
| ``chain_of_thought`` | any chain-of-thought text as model input; the model's own chain of thought for a word problem (greedy, optional repetition controls and budget forcing) |

This module re-exports every public name of those modules (the main ones are in
``sparse_lens.analysis`` too).

How close is sparse to dense? On a 1,297-token chain of thought (60 sentences) on SmolLM2-135M
(``tests/analysis/anchors/test_chain_of_thought.py``), Spearman of the salience /
receiver heads shared of 20: uniform-in-cell ``block_mass`` at 16-token blocks reaches only
0.86 / 10 even with nothing pruned (0.62 / 0 at top_k 16, 65% pruned), because a cell's mass is
not uniform (sentence-final tokens draw much of it); at 8-token blocks, top_k 32 (65% pruned) it
reaches 0.95 / 13. Token-level weights of the kept cells reach 0.97 / 19 at 16-token blocks,
top_k 32 (37% pruned) and 0.99 / 18 at 8-token blocks, top_k 32. At 16-token blocks, top_k 16
(65% pruned) the gap is mostly the estimator's misses: token-level weights give 0.90 / 8 with the
Stream estimate and 0.99 / 19 with the exact top-16 blocks by dense mass (with the rescored
estimator, at 8-token blocks, top_k 32: 0.953 / 14 for ``block_mass``, 0.988 / 18 token-level).

On a chain of thought the model wrote itself (``benchmarks/thought_anchors_cot.py``: 1,316 tokens,
72 sentences, rescored estimator), token-level weights reach 0.994 / 19 at 16-token blocks, top_k
16 (66% pruned) and 0.998 / 20 at 8-token blocks, top_k 32 (65% pruned); ``block_mass`` alone
0.66 / 4 and 0.97 / 12.
"""

from sparse_lens.analysis.anchors.agreement import AnchorAgreement, compare_anchors, rank_average, spearman
from sparse_lens.analysis.anchors.chain_of_thought import (
    ChainOfThought,
    chain_of_thought_anchors,
    generate_chain_of_thought,
    tokenize_chain_of_thought,
)
from sparse_lens.analysis.anchors.dense import sentence_attention_dense, sentence_attention_from_probs
from sparse_lens.analysis.anchors.salience import (
    METHODS,
    PROXIMITY,
    TOP_HEADS,
    ThoughtAnchors,
    anchors_from_vertical_scores,
    fisher_kurtosis,
    observe_thought_anchors,
    thought_anchors,
    vertical_scores,
    vertical_scores_sparse,
)
from sparse_lens.analysis.anchors.sentences import (
    Sentences,
    Span,
    check_sentence_spans,
    sentence_char_spans,
    sentence_ids,
    sentence_one_hot,
    sentence_sizes,
    split_sentences,
)
from sparse_lens.analysis.anchors.sparse import accumulate_sentence_attention, sentence_attention_sparse

__all__ = [
    "METHODS",
    "PROXIMITY",
    "TOP_HEADS",
    "AnchorAgreement",
    "ChainOfThought",
    "Sentences",
    "Span",
    "ThoughtAnchors",
    "accumulate_sentence_attention",
    "anchors_from_vertical_scores",
    "chain_of_thought_anchors",
    "check_sentence_spans",
    "compare_anchors",
    "fisher_kurtosis",
    "generate_chain_of_thought",
    "observe_thought_anchors",
    "rank_average",
    "sentence_attention_dense",
    "sentence_attention_from_probs",
    "sentence_attention_sparse",
    "sentence_char_spans",
    "sentence_ids",
    "sentence_one_hot",
    "sentence_sizes",
    "spearman",
    "split_sentences",
    "thought_anchors",
    "tokenize_chain_of_thought",
    "vertical_scores",
    "vertical_scores_sparse",
]
