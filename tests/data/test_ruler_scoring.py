"""RULER's scoring names (string_match_all / string_match_part, postprocess_pred) against their
definitions, written out per sample, and the analysis layer scoring through them."""

import pytest

import sparse_lens.analysis.task_accuracy as task_accuracy
from sparse_lens.data import postprocess_prediction, ruler_score, score_answer, string_match_all, string_match_part


def test_string_match_all_is_the_case_insensitive_share_found():
    assert string_match_all(" It is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("ABC and def", ["abc", "DEF", "ghi", "jkl"]) == 0.5
    assert string_match_all("nothing here", ["1234567"]) == 0.0
    assert string_match_all("ALPHA-beta and 42", ["alpha-BETA", "43", "42"]) == pytest.approx(2 / 3)


def test_string_match_part_is_one_when_any_answer_is_found():
    assert string_match_part("ABC and def", ["abc", "DEF", "ghi", "jkl"]) == 1.0
    assert string_match_part("only GHI", ["abc", "ghi"]) == 1.0
    assert string_match_part("none of them", ["abc", "ghi"]) == 0.0


def test_postprocessing_turns_control_characters_into_newlines_and_strips():
    assert postprocess_prediction("  12\x0034567\t ") == "12\n34567"
    assert postprocess_prediction("\x01\x02answer\x1f") == "answer"
    assert ruler_score("12\x0034567", ["1234567"]) == 0.0  # the control character splits the number
    assert ruler_score("  The number is 1234567.\x00", ["1234567"]) == 1.0
    assert ruler_score("  \n", ["x"]) == 0.0
    assert postprocess_prediction("a\x1fb\x0bc") == "a\nb\nc"  # the whole range \x00-\x1f, inside the text too


def test_ruler_score_is_the_share_of_all_answers_found():
    """NIAH multi-value / multi-query and variable tracking expect every answer: 1 of 2 found is 0.5."""
    assert ruler_score("  It is 1234567\x00", ["1234567", "7654321"]) == 0.5
    assert ruler_score("1234567 and 7654321", ["7654321", "1234567"]) == 1.0


def test_answers_must_be_a_non_empty_list_of_strings():
    for bad in ([], "1234567"):
        with pytest.raises(ValueError, match="answers"):
            string_match_all("1234567", bad)
        with pytest.raises(ValueError, match="answers"):
            string_match_part("1234567", bad)


def test_score_answer_is_a_deprecated_alias_and_analysis_scores_through_data():
    with pytest.warns(DeprecationWarning, match="string_match_all"):
        assert score_answer("ABC and def", ["abc", "DEF", "ghi", "jkl"]) == 0.5
    assert task_accuracy.ruler_score is ruler_score  # one definition, imported by the analysis layer
