"""Thought anchors, sparse against dense: exact on a tiny model, measured on the real default model."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.thought_anchors import (
    anchors_from_vertical_scores,
    compare_anchors,
    fisher_kurtosis,
    observe_thought_anchors,
    sentence_attention_dense,
    sentence_attention_from_probs,
    sentence_attention_sparse,
    spearman,
    split_sentences,
    thought_anchors,
    vertical_scores,
    vertical_scores_sparse,
)
from sparse_lens.plots import plot_receiver_kurtosis, plot_salience
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, BLOCK = 256, 8


# ----- brute force ----------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def tiny_traces():
    """Observe-mode patterns at two budgets and the dense bridge's token-level patterns."""
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


# ----- tiny model: sparse == dense ------------------------------------------------------------
def test_sparse_sentence_attention_equals_dense_when_nothing_is_pruned_and_blocks_align(tiny_traces):
    traces, probs = tiny_traces
    assert ALIGNED[-1][1] <= SEQ and all(a % BLOCK == 0 and b % BLOCK == 0 for a, b in ALIGNED)
    for layer, pattern in enumerate(traces[SEQ // BLOCK]):
        assert pattern.pruned_fraction() == 0.0
        brute = brute_sentence_matrix(probs[layer].numpy(), ALIGNED)
        from_probs = sentence_attention_from_probs(probs[layer], ALIGNED)
        sparse = sentence_attention_sparse(pattern, ALIGNED)
        exact_dense = sentence_attention_dense(pattern, ALIGNED, query_chunk=48)
        for result in (from_probs, sparse, exact_dense):
            np.testing.assert_allclose(result.numpy(), brute, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(vertical_scores_sparse(pattern, ALIGNED).numpy(),
                                   np.stack([brute_vertical(m) for m in brute]), rtol=1e-5, atol=1e-9)
    sparse_result = thought_anchors(traces[SEQ // BLOCK], ALIGNED, top_heads=3)
    dense_result = thought_anchors(traces[SEQ // BLOCK], ALIGNED, top_heads=3, method="dense")
    assert sparse_result.receiver_heads == dense_result.receiver_heads
    np.testing.assert_allclose(sparse_result.salience.numpy(), dense_result.salience.numpy(), rtol=1e-5)
    assert compare_anchors(sparse_result, dense_result).spearman == pytest.approx(1.0)


def test_observe_thought_anchors_runs_the_model_once_per_budget():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=6))
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    results = observe_thought_anchors(sparse, tokens, UNALIGNED, methods=("sparse", "sparse_tokens", "dense"),
                                      top_heads=3, top_k=SEQ // BLOCK)
    assert sparse.stream.top_k == 6 and sparse.stream.mode == "sparse"  # settings restored
    assert compare_anchors(results["sparse_tokens"], results["dense"]).spearman == pytest.approx(1.0)
    np.testing.assert_allclose(results["sparse_tokens"].salience.numpy(), results["dense"].salience.numpy(), rtol=1e-5)
    assert results["sparse"].method == "sparse" and results["sparse"].n_sentences == len(UNALIGNED)


def test_unaligned_and_pruned_sentences_follow_the_documented_approximation(tiny_traces):
    traces, probs = tiny_traces
    for top_k in (SEQ // BLOCK, 6):
        for layer, pattern in enumerate(traces[top_k]):
            dense = probs[layer].numpy()
            indices = pattern.block_indices[0].numpy()
            expected = brute_block_approximation(dense, UNALIGNED, indices, BLOCK)
            np.testing.assert_allclose(sentence_attention_sparse(pattern, UNALIGNED).numpy(), expected,
                                       rtol=1e-5, atol=1e-9)
            # token_level: the exact dense weights of the kept cells, pruned cells 0
            kept = np.zeros_like(dense, dtype=bool)
            for head in range(indices.shape[0]):
                for row in range(indices.shape[1]):
                    for key_block in indices[head, row][indices[head, row] >= 0]:
                        kept[head, row * BLOCK:(row + 1) * BLOCK, key_block * BLOCK:(key_block + 1) * BLOCK] = True
            np.testing.assert_allclose(
                sentence_attention_sparse(pattern, UNALIGNED, token_level=True).numpy(),
                brute_sentence_matrix(np.where(kept, dense, 0.0), UNALIGNED), rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(
                vertical_scores_sparse(pattern, UNALIGNED, token_level=True).numpy(),
                np.stack([brute_vertical(m) for m in brute_sentence_matrix(np.where(kept, dense, 0.0), UNALIGNED)]),
                rtol=1e-5, atol=1e-9)
    # With pruning the estimate only loses mass: every entry is at most the dense one.
    pruned = traces[6][1]
    assert pruned.pruned_fraction() > 0.5
    dense_matrix = brute_sentence_matrix(probs[1].numpy(), UNALIGNED)
    assert (sentence_attention_sparse(pruned, UNALIGNED, token_level=True).numpy() <= dense_matrix + 1e-7).all()


def test_vertical_scores_kurtosis_receivers_and_salience_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    layers, heads, n = 3, 5, 12
    matrices = torch.rand(layers, heads, n, n, generator=generator) ** 6  # heavy-tailed, like attention
    scores = vertical_scores(matrices)
    brute_scores = np.stack([[brute_vertical(matrices[l, h].numpy()) for h in range(heads)] for l in range(layers)])
    np.testing.assert_allclose(scores.numpy(), brute_scores, rtol=1e-5, equal_nan=True)
    assert torch.isnan(scores[..., -4:]).all() and not torch.isnan(scores[..., :-4]).any()

    result = anchors_from_vertical_scores(scores, top_heads=4)
    kurt = np.array([[brute_kurtosis(brute_scores[l, h]) for h in range(heads)] for l in range(layers)])
    np.testing.assert_allclose(result.kurtosis.numpy(), kurt, rtol=1e-4)
    order = sorted(((l, h) for l in range(layers) for h in range(heads)), key=lambda lh: -kurt[lh])
    assert list(result.receiver_heads) == order[:4]
    salience = np.mean([brute_scores[l, h] for l, h in order[:4]], axis=0)
    np.testing.assert_allclose(result.salience.numpy(), salience, rtol=1e-5, equal_nan=True)
    assert result.anchors(3) == [int(i) for i in np.argsort(-np.nan_to_num(salience, nan=-np.inf))[:3]]
    # layer exclusion, and a constant head has no kurtosis
    assert all(layer != 0 for layer, _ in anchors_from_vertical_scores(scores, top_heads=4, exclude_layers=[0]).receiver_heads)
    assert math.isnan(float(fisher_kurtosis(torch.tensor([1.0, 1.0, 1.0, float("nan")]))))


def test_spearman_and_agreement():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, float("nan"), 3, 4], [2, 5, 1, 3]) == pytest.approx(0.5)  # NaN pair dropped
    scores = torch.rand(2, 3, 10, generator=torch.Generator().manual_seed(0))
    a = anchors_from_vertical_scores(scores, top_heads=3)
    agreement = compare_anchors(a, a, k=4)
    assert agreement.spearman == pytest.approx(1.0) and agreement.receiver_overlap == 1.0 and agreement.anchor_overlap == 1.0


class WordTokenizer:
    """A stand-in fast tokenizer: one token per word with its leading whitespace."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [match.span() for match in re.finditer(r"\s*\S+", text)]
        out = {"input_ids": list(range(len(spans)))}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def test_split_sentences_maps_sentences_to_tokens():
    text = "Question: how many? Let me think. It costs 3.5 dollars!\nWait, no.\n\nSo the answer is 7."
    start = text.index("Let")
    sentences = split_sentences(text, WordTokenizer(), char_range=(start, len(text)), token_offset=1)
    assert sentences.texts == ("Let me think.", "It costs 3.5 dollars!", "Wait, no.", "So the answer is 7.")
    words = [m.group().strip() for m in re.finditer(r"\s*\S+", text)]
    for sentence, (a, b) in zip(sentences.texts, sentences.token_spans):
        assert " ".join(words[a - 1: b - 1]) == sentence  # token_offset=1: a BOS token before the text
    assert list(sentences) == list(sentences.token_spans) and len(sentences) == 4


# ----- the real default model -----------------------------------------------------------------
QUESTION = (
    "A school is taking 187 students and 14 teachers on a field trip. A bus holds 45 people and costs "
    "320 dollars. A van holds 12 people and costs 110 dollars. Every vehicle needs at least one teacher "
    "on board. What is the cheapest way to take everyone, and how much does it cost?"
)

# Written for this test (plain English, 60 sentences): planning, computing, checking, backtracking.
CHAIN_OF_THOUGHT = """Let me start by restating the problem so that I do not miss anything.
There are 187 students and 14 teachers, so 201 people need to travel.
A bus holds 45 people and costs 320 dollars.
A van holds 12 people and costs 110 dollars.
Every vehicle must carry at least one teacher, so we can use at most 14 vehicles.
My plan is to compare the cost per seat of the two vehicles first, then fill up with the cheaper one, and finally deal with the people who are left over.
For a bus, the cost per seat is 320 divided by 45, which is about 7.11 dollars.
For a van, the cost per seat is 110 divided by 12, which is about 9.17 dollars.
So buses are cheaper per seat, and we should use as many buses as makes sense.
Four buses hold 4 times 45, which is 180 people.
That leaves 201 minus 180, which is 21 people.
Two vans carry 24 people, which is enough for the 21 who are left.
The cost would be 4 times 320 plus 2 times 110.
That is 1280 plus 220, so 1500 dollars.
But wait, maybe five buses are cheaper than four buses and two vans.
Five buses hold 225 people, which covers everyone.
Five buses cost 5 times 320, which is 1600 dollars.
That is more than 1500, so four buses and two vans is better so far.
Hmm, what about fewer buses and more vans?
Three buses hold 135 people, leaving 66 people.
Sixty-six people need 6 vans, since 5 vans only hold 60.
The cost is 3 times 320 plus 6 times 110, which is 960 plus 660, or 1620 dollars.
That is worse.
Let me also check the teacher rule for the best option.
Four buses and two vans are six vehicles, and we have 14 teachers, so every vehicle gets a teacher.
Actually, wait, I should double check the number of people.
The problem says 187 students and 14 teachers.
Adding them gives 201, so that part was right.
Now let me reconsider whether a cheaper plan could leave a bus partly empty.
With four buses we have 180 seats and 21 people left over.
One van holds 12, so one van is not enough for 21 people.
What if we used four buses and one van, and squeezed the extra people in?
No, that is not allowed, because the seat limits are strict.
So the leftover 21 people need two vans or one more bus.
One more bus costs 320 dollars, while two vans cost 220 dollars.
Two vans are cheaper, so we keep four buses and two vans.
Let me step back and treat the problem as a small optimization.
We want to minimize 320 times the buses plus 110 times the vans, with at least 201 seats.
We also need the number of vehicles to be at most 14.
For each number of buses, the best number of vans is the smallest one that covers the rest.
With zero buses, we need 17 vans, which breaks the limit of 14 vehicles.
With one bus, 156 people are left, which needs 13 vans, so 14 vehicles in total.
That costs 320 plus 1430, which is 1750 dollars.
With two buses, 111 people are left, which needs 10 vans, costing 640 plus 1100, or 1740 dollars.
With three buses, we found 1620 dollars.
With four buses, we found 1500 dollars.
With five buses, we found 1600 dollars.
So the minimum over all options is 1500 dollars with four buses and two vans.
Wait, I think I made an error with two buses.
Two buses hold 90 people, and 201 minus 90 is 111.
Then 111 divided by 12 is 9.25, so we need 10 vans.
Okay, the number of vans was right, and the cost of 1740 dollars stands.
Let me verify the final answer once more from scratch.
Four buses carry 180 people and two vans carry up to 24 people.
Together that is 204 seats for 201 people, so three seats stay empty.
The buses cost 1280 dollars and the vans cost 220 dollars.
The total is 1500 dollars.
Each of the six vehicles has at least one of the 14 teachers on board.
Therefore the cheapest plan is four buses and two vans.
The answer is 1500 dollars."""

# The budget at which the block_mass-only estimator reaches the target on this trace (see
# the report in test_real_chain_of_thought...): 8-token blocks, 32 kept of up to 163 per row.
REAL_BUDGET = dict(query_block=8, key_block=8, top_k=32, sink_blocks=1, local_blocks=2)
PLANNING = re.compile(r"^(Let me|Wait|But wait|Actually|Hmm|Now let me|My plan|Okay)")


@pytest.fixture(scope="module")
def cot_trace(smollm2):
    tokenizer = smollm2.tokenizer
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": CHAIN_OF_THOUGHT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = text.index(CHAIN_OF_THOUGHT)
    sentences = split_sentences(text, tokenizer, char_range=(start, start + len(CHAIN_OF_THOUGHT)))
    tokens = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), smollm2.stream_settings(**REAL_BUDGET, mode="observe", keep_qk=True):
        _, cache = smollm2.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(smollm2.cfg.n_layers)]
    return tokenizer, tokens, sentences, patterns


def test_real_chain_of_thought_sparse_salience_agrees_with_dense(cot_trace, tmp_path, record_property):
    tokenizer, tokens, sentences, patterns = cot_trace
    assert 1000 <= tokens.shape[1] <= 2000 and len(sentences) == 60
    for text, (a, b) in zip(sentences.texts, sentences.token_spans):
        assert tokenizer.decode(tokens[0, a:b]).strip() == text
    pruned = float(np.mean([pattern.pruned_fraction() for pattern in patterns]))

    dense = thought_anchors(patterns, sentences, method="dense")
    block = thought_anchors(patterns, sentences, method="sparse")
    tokens_level = thought_anchors(patterns, sentences, method="sparse_tokens")
    block_vs_dense, tokens_vs_dense = compare_anchors(block, dense), compare_anchors(tokens_level, dense)
    report = (f"pruned {pruned:.3f}; block_mass: {block_vs_dense}; token-level kept cells: {tokens_vs_dense}\n"
              + dense.summary(sentences.texts))
    print(report)
    record_property("thought_anchors_agreement", report)

    assert pruned >= 0.6, report  # measured 0.649 at this budget
    # block_mass only (the cheap estimator): measured Spearman 0.950, receivers 13/20, top-5 anchors 3/5
    assert block_vs_dense.spearman >= 0.9, report
    assert block_vs_dense.receiver_overlap >= 0.5 and block_vs_dense.anchor_overlap >= 0.4, report
    # token-level weights of the kept cells: measured Spearman 0.988, receivers 18/20, anchors 5/5
    assert tokens_vs_dense.spearman >= 0.95, report
    assert tokens_vs_dense.receiver_overlap >= 0.8 and tokens_vs_dense.anchor_overlap >= 0.8, report
    # The dense reference finds what the paper reports: planning / checking / backtracking sentences.
    assert sum(bool(PLANNING.match(sentences.texts[i])) for i in dense.anchors(5)) >= 2, report

    assert plot_salience(block, tmp_path / "salience.png", sentences=sentences.texts, reference=dense).stat().st_size > 0
    assert plot_receiver_kurtosis(dense, tmp_path / "kurtosis.png").stat().st_size > 0
