"""Offline task generators (RULER-style needle-in-a-haystack, variable tracking) and shipped prose.
Imports nothing from the TransformerLens layer."""

from sparse_lens.data.niah import NeedleSample, needle_prompt, score_answer
from sparse_lens.data.prose import essays, prose_tokens
from sparse_lens.data.ruler import NIAH_VARIANTS, RULER_TASKS, make_sample, niah_sample, variable_tracking

__all__ = [
    "NIAH_VARIANTS",
    "RULER_TASKS",
    "NeedleSample",
    "essays",
    "make_sample",
    "needle_prompt",
    "niah_sample",
    "prose_tokens",
    "score_answer",
    "variable_tracking",
]
