import re

import pytest

from sparse_lens.data import needle_prompt, string_match_all
from sparse_lens.data.niah import INSTRUCTION, NOISE_LINE
from sparse_lens.data.prose import essays
from sparse_lens.data.ruler import (
    DEPTHS,
    NIAH_ANSWER_TOKENS,
    RULER_TASKS,
    VT_ANSWER_TOKENS,
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
        assert tokenizer.decode(sample.input_ids[start:end]).strip() == text
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
