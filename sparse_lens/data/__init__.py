"""Offline task generators (RULER-style needle-in-a-haystack). Imports nothing from the TL layer."""

from sparse_lens.data.niah import NeedleSample, needle_prompt, score_answer
from sparse_lens.data.prose import essays, prose_tokens

__all__ = ["NeedleSample", "essays", "needle_prompt", "prose_tokens", "score_answer"]
