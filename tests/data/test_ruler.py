import itertools
import re

import pytest

from sparse_lens.data import needle_prompt, string_match_all
from sparse_lens.data.niah import INSTRUCTION, NOISE_LINE
from sparse_lens.data.prose import essays
from sparse_lens.data.ruler import (
    ADJECTIVES,
    DEPTHS,
    NIAH_ANSWER_TOKENS,
    NOUNS,
    RULER_TASKS,
    VT_ANSWER_TOKENS,
    _distractor_keys,
    make_sample,
    niah_sample,
)

TASKS = list(RULER_TASKS)
LENGTHS = [1024, 2048]
NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NOISE_SENTENCES = set(re.split(r"(?<=\.) ", NOISE_LINE.strip()))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def samples(tokenizer):
    """Every task at every test length (seed 0, default answer budget), built once."""
    return {(task, length): make_sample(task, tokenizer, length) for task in TASKS for length in LENGTHS}


def user_lines(sample):
    """The user message's lines (SmolLM2's chat template): instruction, haystack lines, question."""
    user = sample.prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    return [line for line in user.split("\n") if line]


def haystack_lines(sample):
    return user_lines(sample)[1:-1]


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", TASKS)
def test_length_is_within_one_percent_of_the_budget(samples, tokenizer, task, length):
    sample = samples[task, length]
    budget = length - (VT_ANSWER_TOKENS if task == "vt" else NIAH_ANSWER_TOKENS)
    assert budget * 0.99 <= sample.length <= budget
    assert sample.input_ids == tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", TASKS)
def test_every_needle_span_decodes_to_its_needle_and_holds_the_answers(samples, tokenizer, task, length):
    sample = samples[task, length]
    assert len(sample.needle_spans) == len(sample.needle_texts) >= 1
    for (start, end), text in zip(sample.needle_spans, sample.needle_texts):
        assert tokenizer.decode(sample.input_ids[start:end]).lstrip(" ") == text  # a space may join it, no newline
    starts_and_ends = [position for span in sample.needle_spans for position in span]
    assert starts_and_ends == sorted(starts_and_ends)  # in document order, not overlapping
    for answer in sample.answers:
        assert any(answer in text for text in sample.needle_texts)
    assert string_match_all(" ".join(sample.needle_texts), sample.answers) == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_seeds_reproduce_and_differ(tokenizer, task):
    first, again = make_sample(task, tokenizer, 1024, seed=7), make_sample(task, tokenizer, 1024, seed=7)
    assert first == again
    other = make_sample(task, tokenizer, 1024, seed=8)
    assert other.answers != first.answers and other.prompt != first.prompt
    assert first.depth in DEPTHS


@pytest.mark.parametrize("task", TASKS)
def test_depth_moves_the_needles(tokenizer, task):
    shallow, deep = (make_sample(task, tokenizer, 1024, depth=depth) for depth in (0.1, 0.9))
    assert shallow.depth == 0.1 and deep.depth == 0.9
    assert shallow.needle_spans[-1][1] < deep.needle_spans[0][0]
    first = make_sample(task, tokenizer, 1024, depth=0.0)
    instruction_end = first.prompt.index(user_lines(first)[0]) + len(user_lines(first)[0])
    assert first.prompt[instruction_end:].lstrip("\n").startswith(first.needle_texts[0])
    with pytest.raises(ValueError, match="depth"):
        make_sample(task, tokenizer, 1024, depth=1.5)


def test_multikey_1_has_four_needles_with_three_distractor_keys(samples):
    sample = samples["niah_multikey_1", 2048]
    found = NEEDLE.findall(sample.prompt)
    keys = [key for key, _ in found]
    assert len(found) == 4 and len(set(keys)) == 4
    assert sample.needle_texts == [match.group(0) for match in NEEDLE.finditer(sample.prompt)]
    queried = [key for key in keys if f"for {key} mentioned" in sample.prompt]
    assert len(queried) == 1
    assert sample.answers == [value for key, value in found if key == queried[0]]


@pytest.mark.parametrize("task, key_pattern", [("niah_multikey_2", "[a-z]+-[a-z]+"), ("niah_multikey_3", UUID.pattern)])
def test_needle_haystack_is_distractor_needles_with_other_keys(samples, tokenizer, task, key_pattern):
    sample = samples[task, 2048]
    lines = haystack_lines(sample)
    needles = [line for line in lines if NEEDLE.fullmatch(line)]
    filler = [line for line in lines if not NEEDLE.fullmatch(line)]
    assert all(set(re.split(r"(?<=\.) ", line)) <= NOISE_SENTENCES for line in filler)  # top-up noise only
    assert len(filler) <= 1 and n_tokens(tokenizer, "".join(filler)) < n_tokens(tokenizer, needles[0])
    keys = [NEEDLE.fullmatch(line).group(1) for line in needles]
    assert all(re.fullmatch(key_pattern, key) for key in keys) and len(set(keys)) == len(keys)
    (queried,) = [key for key in keys if f"for {key} mentioned" in sample.prompt]
    assert [line for line in needles if queried in line] == sample.needle_texts  # the rest are distractors
    assert len(needles) - 1 == len(lines) - len(filler) - 1 > 20
    assert sample.length + n_tokens(tokenizer, needles[0]) > 2048 - NIAH_ANSWER_TOKENS  # no room for one more


def test_multivalue_and_multiquery_expect_four_values(samples):
    multivalue, multiquery = samples["niah_multivalue", 1024], samples["niah_multiquery", 1024]
    assert len(multivalue.answers) == len(set(multivalue.answers)) == 4
    assert len({NEEDLE.fullmatch(text).group(1) for text in multivalue.needle_texts}) == 1  # one key
    assert len({NEEDLE.fullmatch(text).group(1) for text in multiquery.needle_texts}) == 4
    assert len(multiquery.answers) == 4 and "are all the special magic numbers" in multiquery.prompt
    assert string_match_all(" ".join(multivalue.answers[:2]), multivalue.answers) == 0.5


@pytest.mark.parametrize("depth", [None, 0.5])
def test_variable_tracking_hops_are_in_order_and_answers_are_the_chain(tokenizer, depth):
    sample = make_sample("vt", tokenizer, 2048, depth=depth, seed=3)
    positions = [position for span in sample.needle_spans for position in span]
    assert len(sample.needle_texts) == 5 and positions == sorted(positions)
    first = re.fullmatch(r"VAR ([A-Z]{5}) = (\d{5})", sample.needle_texts[0])
    chain = [first.group(1)]
    for hop in sample.needle_texts[1:]:
        new, old = re.fullmatch(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})", hop).groups()
        assert old == chain[-1]
        chain.append(new)
    assert sample.answers == chain and len(set(chain)) == 5
    assert f"assigned the value {first.group(2)} in the text above" in sample.prompt
    assert all(hop in haystack_lines(sample) for hop in sample.needle_texts)  # each hop is a line of its own


def test_essay_haystack_is_shipped_prose_cut_at_sentence_boundaries(samples):
    split = re.compile(r"(?<=[.!?])\s+").split
    shipped = {s for essay in essays() for s in split(" ".join(essay.split("\n", 1)[1].split()))}
    for task in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"):
        sample = samples[task, 1024]
        (context,) = haystack_lines(sample)
        sentences = split(context)
        assert all(s in shipped or s in sample.needle_texts for s in sentences)
        assert len([s for s in sentences if s in shipped]) > 20


def test_single_1_keeps_needle_prompt_conventions(tokenizer):
    ruler = make_sample("niah_single_1", tokenizer, 1024, seed=3, depth=0.5)
    plain = needle_prompt(tokenizer, 1024, seed=3, depth=0.5, answer_tokens=NIAH_ANSWER_TOKENS)
    assert (ruler.answers, ruler.needle_texts, ruler.depth) == (plain.answers, plain.needle_texts, plain.depth)
    assert INSTRUCTION in ruler.prompt
    tail = plain.prompt[plain.prompt.index("\nWhat is") :]
    assert ruler.prompt.endswith(tail)
    assert all(line in ruler.needle_texts or NOISE_LINE.startswith(line) for line in haystack_lines(ruler))


def test_unknown_task_and_too_short_length_raise(tokenizer):
    with pytest.raises(ValueError, match="niah_single_1.*niah_multiquery, vt"):
        make_sample("niah_single_9", tokenizer, 1024)
    with pytest.raises(ValueError, match="niah_multikey_3"):
        niah_sample(tokenizer, 1024, "single_1")
    with pytest.raises(ValueError, match="without any haystack"):
        make_sample("niah_multiquery", tokenizer, 200)


def test_rulers_constants():
    """RULER's 40 evenly spaced depths from 0% to 100%, and its answer budgets (tokens_to_generate)."""
    assert len(DEPTHS) == 40 and DEPTHS[0] == 0.0 and DEPTHS[-1] == 1.0
    assert all(b - a == pytest.approx(1 / 39) for a, b in itertools.pairwise(DEPTHS))
    assert (NIAH_ANSWER_TOKENS, VT_ANSWER_TOKENS) == (128, 30)


def test_number_values_have_seven_digits(samples):
    values = [value for sample in samples.values() for _, value in NEEDLE.findall(sample.prompt) if not UUID.fullmatch(value)]
    assert len(values) > 100 and all(re.fullmatch(r"[1-9]\d{6}", value) for value in values)


def test_questions_and_instruction_follow_the_value_kind_and_the_keys_asked(samples):
    """Singular for one expected value, plural (and every key named) otherwise; the instruction
    names the value kind (uuids for niah_single_3)."""
    single, multivalue, multiquery = (samples[task, 1024] for task in ("niah_single_2", "niah_multivalue", "niah_multiquery"))
    assert "What is the special magic number for" in single.prompt
    assert "What are all the special magic numbers for" in multivalue.prompt
    keys = [NEEDLE.fullmatch(text).group(1) for text in multiquery.needle_texts]
    asked = re.search(r"numbers for (.+) mentioned in the provided text\?", multiquery.prompt).group(1)
    assert sorted(asked.replace(", and ", ", ").split(", ")) == sorted(keys)
    assert "Some special magic uuids are hidden" in samples["niah_single_3", 1024].prompt
    assert "Some special magic numbers are hidden" in single.prompt


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery"])
def test_sample_depth_is_the_depth_of_the_first_answers_needle(samples, task):
    """In an essay haystack of N sentences, a needle at depth d has round(d * N) haystack sentences
    before it (multikey_1 and multiquery at seed 0 ask about their second needle first)."""
    for length in LENGTHS:
        sample = samples[task, length]
        sentences = re.split(r"(?<=[.!?])\s+", haystack_lines(sample)[0])
        haystack = [s for s in sentences if s not in sample.needle_texts]
        first = next(i for i, s in enumerate(sentences) if s in sample.needle_texts and sample.answers[0] in s)
        before = len([s for s in sentences[:first] if s not in sample.needle_texts])
        assert before == round(sample.depth * len(haystack))


def test_distractor_keys_never_repeat_a_needles_key():
    import random

    taken = ["amber-anchor", "quiet-river"]
    keys = list(itertools.islice(_distractor_keys("words", random.Random(0), taken), 3 * len(ADJECTIVES) * len(NOUNS)))
    assert not set(keys) & set(taken)
    first_pass = keys[: len(ADJECTIVES) * len(NOUNS) - len(taken)]  # every other pair once before any repeats
    assert len(set(first_pass)) == len(first_pass)


def test_answer_tokens_set_the_budget(tokenizer):
    sample = make_sample("niah_single_1", tokenizer, 1024, answer_tokens=300)
    assert 0.99 * (1024 - 300) <= sample.length <= 1024 - 300

