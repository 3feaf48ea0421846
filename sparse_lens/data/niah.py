"""Needle-in-a-haystack prompts, RULER style (NVIDIA/RULER task facts; generated offline).

``needle_prompt`` builds RULER's ``niah_single_1``: a noise haystack ("The grass is green. ...")
with one needle "One of the special magic numbers for {key} is: {value}." at a chosen depth,
fitted to a token length with the model's own tokenizer. The sample records the needle's token
span so that route and recall analyses can find it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sparse_lens.data.ruler_scoring import score_answer  # noqa: F401  (deprecated alias, old home)

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
ADJECTIVES = ["amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly",
              "keen", "lively", "mellow", "noisy", "odd", "proud", "quiet", "rusty", "shiny", "tidy"]
NOUNS = ["anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel"]


@dataclass(frozen=True)
class NeedleSample:
    """One prompt: its text and token ids, the expected answers and the needles' token spans."""

    prompt: str
    input_ids: list[int]
    answers: list[str]
    needle_spans: list[tuple[int, int]]  # [start, end) token positions in input_ids
    needle_texts: list[str]
    depth: float

    @property
    def length(self) -> int:
        return len(self.input_ids)


def needle_prompt(
    tokenizer: Any,
    length: int,
    *,
    depth: float = 0.5,
    seed: int = 0,
    answer_tokens: int = 16,
    haystack: str | None = None,
) -> NeedleSample:
    """A single-needle prompt of at most ``length - answer_tokens`` tokens (as close as the lines allow).

    ``depth`` in [0, 1] places the needle at that fraction of the haystack lines. ``haystack``: a
    document (e.g. the user's own text) whose non-blank lines replace the generated noise lines,
    from its start; the prompt is shorter than ``length`` when the document is.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    rng = random.Random(seed)
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = f"One of the special magic numbers for {key} is: {value}.\n"
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    answer_prefix = f"The special magic number for {key} mentioned in the provided text is"
    budget = length - answer_tokens
    lines = None if haystack is None else [line.rstrip("\n") + "\n" for line in haystack.splitlines() if line.strip()]
    max_lines = None if lines is None else len(lines)

    def filler(start: int, end: int) -> str:
        return NOISE_LINE * (end - start) if lines is None else "".join(lines[start:end])

    def build(n_lines: int) -> tuple[str, str]:
        before = int(round(depth * n_lines))
        head = _format(tokenizer, INSTRUCTION + filler(0, before), question, answer_prefix, part="head")
        body = needle + filler(before, n_lines)
        return head, _format(tokenizer, INSTRUCTION + filler(0, before) + body, question, answer_prefix)

    n_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    low, high = 0, max(1, budget // max(1, n_tokens(NOISE_LINE) - 1))
    if max_lines is not None:
        high = min(high, max_lines)
    while (max_lines is None or high < max_lines) and n_tokens(build(high)[1]) <= budget:
        high = high * 2 if max_lines is None else min(high * 2, max_lines)
    while low < high:  # largest line count that fits the budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if n_tokens(build(mid)[1]) <= budget else (low, mid - 1)
    head, prompt = build(low)
    input_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    needle_start = n_tokens(head)
    needle_end = needle_start + n_tokens(needle)
    return NeedleSample(prompt, input_ids, [value], [(needle_start, needle_end)], [needle.strip()], depth)


def _format(tokenizer: Any, context: str, question: str, answer_prefix: str, part: str = "all") -> str:
    """The chat-formatted prompt (if the tokenizer has a chat template); ``part="head"`` returns
    only the text up to the end of ``context``, for locating spans."""
    user = context + "\n" + question if part == "all" else context
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        if part == "head":
            return text[: text.index(context) + len(context)]
        return text + answer_prefix
    return user if part == "head" else user + "\n" + answer_prefix
