"""ruler_accuracy on a tiny model: scoring as RULER does, greedy answers checked against a plain loop."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.task_accuracy import RulerAccuracy, RulerRecord, ruler_score
from sparse_lens.data import NeedleSample
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, NEW = 96, 5


def decode(ids):
    return " ".join(f"<t{i}>" for i in ids)


def samples(n=2):
    generator = torch.Generator().manual_seed(1)
    return [("task_a" if i % 2 == 0 else "task_b",
             NeedleSample("", torch.randint(0, 90, (SEQ,), generator=generator).tolist(), ["nothing"], [(10, 20)], ["n"], 0.5))
            for i in range(n)]


def test_ruler_score_is_string_match_all():
    assert ruler_score("The number is 1234567.", ["1234567"]) == 1.0
    assert ruler_score("ALPHA-beta and 42", ["alpha-BETA", "43", "42"]) == pytest.approx(2 / 3)
    assert ruler_score("12\x0034567", ["1234567"]) == 0.0  # control characters become newlines
    assert ruler_score("  \n", ["x"]) == 0.0


def test_sparse_equals_dense_when_top_k_covers_everything_and_matches_a_plain_greedy_loop():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=64)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    pairs = samples()
    result = sl.ruler_accuracy(sparse, pairs, max_new_tokens=NEW, decode=decode, progress=False, needles=True)
    for (_, sample), record in zip(pairs, result.records):
        tokens = torch.tensor([sample.input_ids])
        with torch.no_grad():  # greedy by brute force: the whole sequence again at every step, plain dense bridge
            for _ in range(NEW):
                tokens = torch.cat([tokens, dense(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert record.dense_output == decode(tokens[0, SEQ:].tolist())
        assert record.same_output and record.dense_new_tokens == record.sparse_new_tokens == NEW
        assert record.dense_score == record.sparse_score == 0.0
        assert record.needle["kept_share"] in (None, 1.0) and record.needle["missed_heads"] == 0
    assert result.output_agreement == 1.0 and result.dense_accuracy == result.sparse_accuracy == 0.0
    assert set(result.per_task()) == {"task_a", "task_b"} and result.to_dict()["records"][0]["task"] == "task_a"


def test_scores_and_early_stop_follow_the_answers():
    """Answers taken from the model's own greedy output: found (case-insensitively), and decoding
    stops as soon as every one of them is in the output."""
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    (_, sample), = samples(1)
    first = sl.ruler_accuracy(sparse, [sample], max_new_tokens=NEW, decode=decode, progress=False).records[0]
    words = first.dense_output.split()
    answered = NeedleSample("", sample.input_ids, [words[1].upper(), "absent"], sample.needle_spans, ["n"], 0.5)
    record = sl.ruler_accuracy(sparse, [answered], max_new_tokens=NEW, decode=decode, progress=False).records[0]
    assert record.dense_output == first.dense_output and record.dense_score == 0.5
    solved = NeedleSample("", sample.input_ids, [words[1]], sample.needle_spans, ["n"], 0.5)
    record = sl.ruler_accuracy(sparse, [solved], max_new_tokens=NEW, decode=decode, progress=False).records[0]
    stop = words.index(words[1]) + 1  # the first step whose output holds the answer
    assert record.dense_output == " ".join(words[:stop]) and record.dense_score == 1.0 and record.dense_new_tokens == stop


def test_accuracy_is_the_mean_of_sample_scores():
    def record(dense, sparse_score):
        return RulerRecord("t", 10, ["a"], "a", "b", dense, sparse_score, 1, 1, 0.1, 0.1)
    result = RulerAccuracy([record(1.0, 0.5), record(0.0, 0.0), record(1.0, 1.0)], {}, 8)
    assert result.dense_accuracy == pytest.approx(2 / 3) and result.sparse_accuracy == pytest.approx(0.5)
    assert result.output_agreement == 0.0 and result.summary()["per_task"]["t"]["samples"] == 3
