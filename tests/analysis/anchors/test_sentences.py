"""Sentence splitting and the mapping of sentences onto tokens."""

from __future__ import annotations

import re

import pytest

from sparse_lens.analysis.anchors.sentences import check_sentence_spans, sentence_char_spans, split_sentences
from tests.byte_tokenizer import byte_tokenizer


class WordTokenizer:
    """A stand-in fast tokenizer: one token per word with its leading whitespace."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [match.span() for match in re.finditer(r"\s*\S+", text)]
        out = {"input_ids": list(range(len(spans)))}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


TEXT = "Question: how many? Let me think. It costs 3.5 dollars!\nWait, no.\n\nSo the answer is 7."


def test_sentence_char_spans_split_at_end_punctuation_and_newlines():
    pieces = [TEXT[a:b] for a, b in sentence_char_spans(TEXT)]
    assert pieces == ["Question: how many?", "Let me think.", "It costs 3.5 dollars!", "Wait, no.", "So the answer is 7."]
    quoted = 'He said "stop." (Then left.) e.g.x is one'
    assert [quoted[a:b] for a, b in sentence_char_spans(quoted)] == ['He said "stop."', "(Then left.)", "e.g.x is one"]
    assert [quoted[a:b] for a, b in sentence_char_spans(quoted, (16, len(quoted)))] == ["(Then left.)", "e.g.x is one"]


def test_split_sentences_maps_sentences_to_tokens():
    start = TEXT.index("Let")
    sentences = split_sentences(TEXT, WordTokenizer(), char_range=(start, len(TEXT)), token_offset=1)
    assert sentences.texts == ("Let me think.", "It costs 3.5 dollars!", "Wait, no.", "So the answer is 7.")
    words = [m.group().strip() for m in re.finditer(r"\s*\S+", TEXT)]
    for sentence, (a, b) in zip(sentences.texts, sentences.token_spans):
        assert " ".join(words[a - 1: b - 1]) == sentence  # token_offset=1: a BOS token before the text
    assert list(sentences) == list(sentences.token_spans) and len(sentences) == 4
    assert sentences[0] == sentences.token_spans[0]
    assert [TEXT[a:b] for a, b in sentences.char_spans] == list(sentences.texts)


def test_split_sentences_on_a_real_fast_tokenizer_decodes_each_sentence():
    tokenizer = byte_tokenizer()
    sentences = split_sentences(TEXT, tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(sentences) == 5
    for text, (a, b) in zip(sentences.texts, sentences.token_spans):
        assert tokenizer.decode(ids[a:b]).strip() == text
    with pytest.raises(ValueError, match="tokenizer"):
        split_sentences(TEXT)


def test_spans_are_checked():
    assert check_sentence_spans([(1, 3), (3, 5)], 5) == [(1, 3), (3, 5)]
    for bad in ([(3, 5), (1, 3)], [(1, 1)], [(4, 6)], [], [(1, 3), (2, 5)]):  # ..., overlapping by one token
        with pytest.raises(ValueError):
            check_sentence_spans(bad, 5)


def test_a_sentence_without_a_token_of_its_own_merges_into_the_previous_one():
    text = "Hi. Yo. Ok."
    sentences = split_sentences(text, offsets=[(0, 3), (3, 11)])  # the second token holds "Yo. Ok."
    assert sentences.texts == ("Hi.", "Yo. Ok.") and sentences.char_spans == ((0, 3), (4, 11))
    assert sentences.token_spans == ((0, 1), (1, 2))


def test_a_token_starting_at_the_end_of_the_char_range_is_outside_it():
    text = "Hi. Yo. Ok."
    sentences = split_sentences(text, offsets=[(0, 3), (3, 7), (7, 11)], char_range=(0, 8))  # " Ok." starts at 8
    assert sentences.texts == ("Hi.", "Yo.") and sentences.token_spans == ((0, 1), (1, 2))

