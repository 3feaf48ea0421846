import pytest

from sparse_lens.data import needle_prompt


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.mark.parametrize("length", [1024, 2048])
def test_length_is_within_one_percent_of_target(tokenizer, length):
    sample = needle_prompt(tokenizer, length, answer_tokens=0)
    assert length * 0.99 <= sample.length <= length


def test_needle_span_decodes_to_the_needle(tokenizer):
    for depth in (0.0, 0.37, 1.0):
        sample = needle_prompt(tokenizer, 700, depth=depth, seed=5)
        start, end = sample.needle_spans[0]
        assert tokenizer.decode(sample.input_ids[start:end]).strip() == sample.needle_texts[0]
        assert sample.answers[0] in sample.needle_texts[0]


def test_seed_reproduces_and_depth_moves_the_needle(tokenizer):
    first, again = needle_prompt(tokenizer, 600, seed=3), needle_prompt(tokenizer, 600, seed=3)
    assert first == again
    assert needle_prompt(tokenizer, 600, seed=4).answers != first.answers
    shallow, deep = needle_prompt(tokenizer, 600, depth=0.1), needle_prompt(tokenizer, 600, depth=0.9)
    assert shallow.needle_spans[0][0] < deep.needle_spans[0][0]
    with pytest.raises(ValueError):
        needle_prompt(tokenizer, 600, depth=1.5)



def test_prose_tokens_are_exact_length_and_seeded(tokenizer):
    from sparse_lens.data import essays, prose_tokens

    assert len(essays()) == 9 and all(essay.startswith("# ") for essay in essays())
    ids = prose_tokens(tokenizer, 12_000)  # longer than the essays: they cycle
    assert len(ids) == 12_000
    assert prose_tokens(tokenizer, 500, seed=1) == prose_tokens(tokenizer, 500, seed=1)
    assert prose_tokens(tokenizer, 500, seed=1) != prose_tokens(tokenizer, 500, seed=2)


def test_needle_prompt_is_rulers_niah_single_1_at_a_chosen_depth(tokenizer):
    from sparse_lens.data import niah_sample

    for kwargs in ({"depth": 0.3, "seed": 2}, {"depth": 1.0, "seed": 0, "answer_tokens": 8}):
        assert needle_prompt(tokenizer, 600, **kwargs) == niah_sample(tokenizer, 600, "niah_single_1", **{
            "answer_tokens": 16, **kwargs})


def test_a_document_is_the_haystack_and_never_padded(tokenizer):
    lines = [f"Line {index} of my own notes." for index in range(400)]
    long = needle_prompt(tokenizer, 500, answer_tokens=4, haystack="\n\n".join(lines))  # blank lines dropped
    context = long.prompt[long.prompt.index("afterwards.\n") + len("afterwards.\n"): long.prompt.index("\nWhat is")]
    body = [line for line in context.splitlines() if line not in long.needle_texts]
    assert body == lines[: len(body)] and len(context.splitlines()) == len(body) + 1
    assert 0.97 * 496 <= long.length <= 496  # a long document fills the budget
    short = needle_prompt(tokenizer, 2000, answer_tokens=4, haystack="\n".join(lines[:10]))
    assert short.length < 1000 and all(line in short.prompt for line in lines[:10])  # all of it, nothing added
    start, end = short.needle_spans[0]
    assert tokenizer.decode(short.input_ids[start:end]).strip() == short.needle_texts[0]
