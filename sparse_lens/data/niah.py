"""Needle-in-a-haystack prompts for tracing: :func:`needle_prompt` is RULER's ``niah_single_1``
(:func:`sparse_lens.data.ruler.niah_sample`, the one needle generator) at a chosen depth, with an
optional document of the user's as the haystack.

The sample records the needle's token span so that route and recall analyses can find it. The
names this module used to define (``NeedleSample``, ``NOISE_LINE``, ``INSTRUCTION``, ``ADJECTIVES``,
``NOUNS``; ``score_answer``, now RULER's ``string_match_all``) are imported from their homes,
:mod:`sparse_lens.data.ruler` and :mod:`sparse_lens.data.ruler_scoring`.
"""

from __future__ import annotations

from typing import Any

from sparse_lens.data.ruler import (  # noqa: F401  (re-exported: their old home)
    ADJECTIVES,
    INSTRUCTION,
    NOISE_LINE,
    NOUNS,
    NeedleSample,
    niah_sample,
)
from sparse_lens.data.ruler_scoring import score_answer  # noqa: F401  (deprecated alias, old home)


def needle_prompt(
    tokenizer: Any,
    length: int,
    *,
    depth: float = 0.5,
    seed: int = 0,
    answer_tokens: int = 16,
    haystack: str | None = None,
) -> NeedleSample:
    """A single-needle prompt (RULER's ``niah_single_1``: noise haystack, "One of the special magic
    numbers for {key} is: {value}.") of at most ``length - answer_tokens`` tokens, filled as close
    to that as the haystack allows.

    ``depth`` in [0, 1] places the needle at that fraction of the haystack lines. ``haystack``: a
    document (e.g. the user's own text) whose non-blank lines replace the generated noise lines,
    from its start; the prompt is shorter than ``length`` when the document is. Same as
    ``niah_sample(tokenizer, length, "niah_single_1", depth=depth, seed=seed,
    answer_tokens=answer_tokens, haystack=haystack)``.
    """
    return niah_sample(tokenizer, length, "niah_single_1", depth=depth, seed=seed, answer_tokens=answer_tokens,
                       haystack=haystack)
