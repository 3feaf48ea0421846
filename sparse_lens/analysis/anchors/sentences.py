"""Sentences of a chain of thought and the token span each occupies (step 0 of the method).

A regex splitter (``.``, ``!``, ``?`` followed by whitespace, and newlines) cuts the text into
sentences; the tokenizer's character offsets map each sentence onto tokens. The span helpers at
the end are shared by the dense and sparse aggregations.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

Span = tuple[int, int]

# A sentence ends after a run of . ! ? (and closing quotes/brackets) followed by whitespace, or at
# a newline. "3.5" or "e.g.x" do not end one (no whitespace after the point).
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|\n")


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


def check_sentence_spans(spans: Sequence[Span], seq_len: int) -> list[Span]:
    """``spans`` as int pairs ``[start, end)`` in tokens; ``ValueError`` unless they are non-empty,
    ascending, disjoint and inside ``[0, seq_len)``, and at least one."""
    spans = [(int(a), int(b)) for a, b in spans]
    previous_end = 0
    for a, b in spans:
        if not 0 <= a < b <= seq_len or a < previous_end:
            raise ValueError(f"Sentence spans must be non-empty, ascending, disjoint and inside [0, {seq_len}); got {spans}.")
        previous_end = b
    if not spans:
        raise ValueError("No sentences.")
    return spans


def sentence_ids(spans: Sequence[Span], seq_len: int, device=None) -> Tensor:
    """int64 [seq_len]: each position's sentence index, -1 outside every span."""
    ids = torch.full((seq_len,), -1, dtype=torch.int64, device=device)
    for index, (a, b) in enumerate(spans):
        ids[a:b] = index
    return ids


def sentence_one_hot(ids: Tensor, n: int) -> Tensor:
    """[len(ids), n] float32 indicator of each position's sentence (all zero outside sentences)."""
    return torch.nn.functional.one_hot(ids.clamp(min=0), n).float() * (ids >= 0)[:, None]


def sentence_sizes(spans: Sequence[Span]) -> Tensor:
    """float64 [len(spans)]: each sentence's length in tokens."""
    return torch.tensor([b - a for a, b in spans], dtype=torch.float64)
