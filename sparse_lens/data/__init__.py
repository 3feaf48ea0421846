"""Offline task generators (RULER-style needle-in-a-haystack, variable tracking), shipped prose, and
word problems with a chain-of-thought prompt. Imports nothing from the TransformerLens layer."""

from sparse_lens.data.chain_of_thought import WORD_PROBLEMS, WordProblem, chain_of_thought_prompt
from sparse_lens.data.niah import NeedleSample, needle_prompt
from sparse_lens.data.prose import essays, prose_tokens
from sparse_lens.data.ruler import NIAH_VARIANTS, RULER_TASKS, make_sample, niah_sample, variable_tracking
from sparse_lens.data.ruler_scoring import (
    postprocess_prediction,
    ruler_score,
    score_answer,
    string_match_all,
    string_match_part,
)

__all__ = [
    "NIAH_VARIANTS",
    "RULER_TASKS",
    "NeedleSample",
    "WORD_PROBLEMS",
    "WordProblem",
    "chain_of_thought_prompt",
    "essays",
    "make_sample",
    "needle_prompt",
    "niah_sample",
    "postprocess_prediction",
    "prose_tokens",
    "ruler_score",
    "score_answer",
    "string_match_all",
    "string_match_part",
    "variable_tracking",
]
