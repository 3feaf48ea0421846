"""RULER's scoring, under RULER's names (NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` and
``evaluate.py``), in one place: what the model wrote is post-processed, then matched.

- :func:`postprocess_prediction` (RULER's ``postprocess_pred``): strip, every control character
  (``\\x00``-``\\x1f``) becomes a newline, strip again.
- :func:`string_match_all` (NIAH, variable tracking): the share of the expected strings found in
  the prediction, case-insensitively.
- :func:`string_match_part` (RULER's QA tasks): 1 if any expected string is found, else 0.
- :func:`ruler_score`: ``string_match_all`` of the post-processed prediction, one sample's score
  as RULER computes it for the tasks in :mod:`sparse_lens.data.ruler`.

These score one sample, as fractions in [0, 1]; RULER averages them over samples and prints x100.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters -> newline, strip."""
    return _CONTROL_CHARACTERS.sub("\n", prediction.strip()).strip()


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty sequence of strings, got {answers!r}.")
    return list(answers)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the share of ``answers`` that occur in
    ``prediction``, case-insensitively (in [0, 1])."""
    answers = _check_answers(answers)
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_part`` for one sample: 1.0 if any of ``answers`` occurs in
    ``prediction`` (case-insensitively), else 0.0."""
    answers = _check_answers(answers)
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


def ruler_score(prediction: str, answers: Sequence[str]) -> float:
    """One sample's RULER score for NIAH and variable tracking:
    ``string_match_all(postprocess_prediction(prediction), answers)``."""
    return string_match_all(postprocess_prediction(prediction), answers)


def score_answer(output: str, answers: Sequence[str]) -> float:
    """Deprecated alias of :func:`string_match_all` (removed in the next release)."""
    warnings.warn("sparse_lens.data.score_answer is renamed string_match_all (RULER's name); "
                  "score_answer will be removed in the next release.", DeprecationWarning, stacklevel=2)
    return string_match_all(output, answers)
