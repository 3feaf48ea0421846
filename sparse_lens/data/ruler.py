"""RULER's needle-in-a-haystack and variable-tracking tasks, generated offline (NVIDIA/RULER task facts).

Every sample is a :class:`NeedleSample`, seeded (one ``random.Random(seed)``
draws every key, value, UUID, depth and haystack), fitted to a token length with the model's own
tokenizer, and records the token span of every needle. Needles read
"One of the special magic {numbers|uuids} for {key} is: {value}."; word keys are adjective-noun
pairs, numbers have 7 digits, UUIDs are version-4 UUIDs drawn from the seeded RNG.

Haystacks:

- noise: the line "The grass is green. ... There and back again." repeated; needles are lines.
- essay: sentences of the essays shipped in ``texts/essays.txt`` (:func:`~sparse_lens.data.prose.essays`),
  original prose written for sparse_lens and dedicated to the public domain (CC0 1.0). RULER uses
  Paul Graham's essays, which are not shippable; these are not them. The haystack starts and ends
  at sentence boundaries and needles go in between sentences.
- needle: distractor needles with other keys, one per line.
- a document (``haystack=`` of :func:`niah_sample`, e.g. the user's own text): its non-blank lines,
  in order, never more than it has (the prompt is shorter than the budget when the document is).

Tasks (``RULER_TASKS``):

- ``niah_single_1``: noise haystack, word key, number value
  (:func:`~sparse_lens.data.niah.needle_prompt` is this task at a chosen depth).
- ``niah_single_2``: essay haystack, word key, number value.
- ``niah_single_3``: essay haystack, word key, UUID value.
- ``niah_multikey_1``: essay haystack, 4 needles with distinct keys, one of them queried.
- ``niah_multikey_2``: needle haystack (word keys, number values), one needle queried.
- ``niah_multikey_3``: needle haystack (UUID keys, UUID values), one needle queried.
- ``niah_multivalue``: essay haystack, one key with 4 values in 4 needles, all 4 expected.
- ``niah_multiquery``: essay haystack, 4 keys, all queried, all 4 values expected.
- ``vt`` (variable tracking): the chain "VAR AAAAA = 12345", "VAR BBBBB = VAR AAAAA", ... (4 hops)
  inserted in order into the noise haystack; the answers are the 5 variables of the chain.

Needle depths (fractions of the haystack's pieces) are drawn from ``DEPTHS``, 40 evenly spaced
depths in [0, 1], distinct and sorted, one per needle; a given ``depth`` puts every needle there,
in order. ``NeedleSample.depth`` is the depth of the needle holding the first answer.

Length fitting (RULER's method): estimate tokens per haystack unit from a sample, then search the
number of units so that prompt tokens + ``answer_tokens`` <= ``length``. Whole units can leave up
to one unit unused, so the fit is then refined: line haystacks are topped up with noise sentences
(fewer tokens than one line), essay haystacks slide their first sentence, both until the prompt
fills 99.5% of the budget. A needle's token span ends at the token count of the prompt up to the
needle's end and starts its own token count earlier; every span is checked to decode to its needle.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import string
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from sparse_lens.data.prose import essays

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


NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = [i / 39 for i in range(40)]  # RULER: 40 evenly spaced depths from 0% to 100%
NIAH_ANSWER_TOKENS = 128  # RULER's tokens_to_generate for NIAH
VT_ANSWER_TOKENS = 30  # ... and for variable tracking
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
NOISE_SENTENCES = re.split(r"(?<=\.) ", NOISE_LINE.strip())
FILL = 0.995  # essay windows slide until the prompt fills this share of the budget ...
MAX_SLIDES = 100  # ... or this many sentences have been tried
SAMPLE_UNITS = 20  # haystack units used to estimate tokens per unit


@dataclass(frozen=True)
class NiahVariant:
    """One NIAH task: haystack ("noise", "essay" or "needle"), kinds of key and value, and counts."""

    haystack: str
    key_kind: str  # "words" (adjective-noun) or "uuids"
    value_kind: str  # "numbers" (7 digits) or "uuids"
    keys: int = 1  # needles with distinct keys
    values: int = 1  # values (needles) per key
    queries: int = 1  # keys the question asks about


NIAH_VARIANTS = {
    "niah_single_1": NiahVariant("noise", "words", "numbers"),
    "niah_single_2": NiahVariant("essay", "words", "numbers"),
    "niah_single_3": NiahVariant("essay", "words", "uuids"),
    "niah_multikey_1": NiahVariant("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahVariant("needle", "words", "numbers"),
    "niah_multikey_3": NiahVariant("needle", "uuids", "uuids"),
    "niah_multivalue": NiahVariant("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahVariant("essay", "words", "numbers", keys=4, queries=4),
}


# ----- random keys and values (all from the seeded RNG) --------------------------------------
def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


_MAKERS = {"words": _word_key, "numbers": _number, "uuids": _uuid}


def _distinct(make: Callable[[random.Random], str], rng: random.Random, count: int) -> list[str]:
    drawn: list[str] = []
    while len(drawn) < count:
        if (item := make(rng)) not in drawn:
            drawn.append(item)
    return drawn


def _distractor_keys(kind: str, rng: random.Random, taken: list[str]) -> Iterator[str]:
    """Endless keys other than ``taken``; word keys go through every adjective-noun pair before repeating."""
    if kind == "uuids":
        while True:
            yield _uuid(rng)
    pool = [key for key in (f"{a}-{n}" for a in ADJECTIVES for n in NOUNS) if key not in taken]
    while True:
        rng.shuffle(pool)
        yield from pool


def _needle_depths(rng: random.Random, count: int, depth: float | None) -> list[float]:
    if depth is None:
        return sorted(rng.sample(DEPTHS, count))
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    return [depth] * count


# ----- haystacks: pieces of text between which needles go -----------------------------------
@dataclass(frozen=True)
class _Window:
    """Which part of a haystack's endless unit stream a prompt shows."""

    count: int  # units (lines or sentences)
    start: int = 0  # first sentence (essays slide it)
    filler: int = 0  # noise sentences after the lines (line haystacks)


def _noise_lines(sentences: int) -> list[str]:
    """``sentences`` noise sentences, five to a line."""
    cycle = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(sentences)]
    return [" ".join(cycle[i : i + len(NOISE_SENTENCES)]) for i in range(0, sentences, len(NOISE_SENTENCES))]


class _LineHaystack:
    """Lines (the noise line, or distractor needles) joined by newlines, topped up with noise sentences."""

    separator, tail = "\n", "\n"

    def __init__(self, lines: Iterator[str]):
        self._source, self._lines = lines, []

    def pieces(self, window: _Window) -> list[str]:
        while len(self._lines) < window.count:  # drawn in order, so line i never depends on the window
            self._lines.append(next(self._source))
        return self._lines[: window.count] + _noise_lines(window.filler)

    def refine(self, window: _Window, tokens: Callable[[_Window], int], budget: int) -> _Window:
        if tokens(window) >= FILL * budget:
            return window
        return replace(window, filler=_largest(lambda n: tokens(replace(window, filler=n)) <= budget))


class _EssayHaystack:
    """Sentences of the shipped essays (seeded order, cycled), joined by spaces."""

    separator, tail = " ", ""

    def __init__(self, rng: random.Random):
        order = essays()
        rng.shuffle(order)
        self._sentences = [sentence for essay in order for sentence in _sentences(essay)]

    def pieces(self, window: _Window) -> list[str]:
        return [self._sentences[(window.start + i) % len(self._sentences)] for i in range(window.count)]

    def refine(self, window: _Window, tokens: Callable[[_Window], int], budget: int) -> _Window:
        """Slide the first sentence forward, refitting the count, until the prompt fills the budget."""
        best, count = window, window.count
        for start in range(1, MAX_SLIDES + 1):
            if tokens(best) >= FILL * budget:
                break
            while tokens(_Window(count + 1, start)) <= budget:
                count += 1
            while count > 0 and tokens(_Window(count, start)) > budget:
                count -= 1
            if tokens(_Window(count, start)) > tokens(best):
                best = _Window(count, start)
        return best


class _DocumentHaystack:
    """The non-blank lines of a given document, in order, joined by newlines; at most all of them."""

    separator, tail = "\n", "\n"

    def __init__(self, document: str):
        self._lines = [line for line in document.splitlines() if line.strip()]
        self.max_units = len(self._lines)

    def pieces(self, window: _Window) -> list[str]:
        return self._lines[: window.count]

    def refine(self, window: _Window, tokens: Callable[[_Window], int], budget: int) -> _Window:
        return window


def _sentences(essay: str) -> list[str]:
    body = " ".join(essay.split("\n", 1)[1].split())  # without the "# Title" line, one space between words
    return re.split(r"(?<=[.!?])\s+", body)


def _haystack(variant: NiahVariant, rng: random.Random, keys: list[str]) -> _LineHaystack | _EssayHaystack:
    if variant.haystack == "noise":
        return _LineHaystack(itertools.repeat(NOISE_LINE.strip()))
    if variant.haystack == "essay":
        return _EssayHaystack(rng)
    make_value, kind = _MAKERS[variant.value_kind], variant.value_kind
    distractor_keys = _distractor_keys(variant.key_kind, rng, taken=keys)
    return _LineHaystack(NEEDLE.format(kind=kind, key=key, value=make_value(rng)) for key in distractor_keys)


# ----- prompts, fitting and spans -------------------------------------------------------------
@dataclass(frozen=True)
class _Content:
    """What a sample says, whatever its haystack: needles (with non-decreasing depths), question, answers."""

    instruction: str
    needles: list[str]
    depths: list[float]
    question: str
    answer_prefix: str
    answers: list[str]
    depth: float


def _context(content: _Content, pieces: list[str], separator: str, tail: str) -> tuple[str, list[tuple[int, int]]]:
    """The instruction and pieces with each needle at round(depth * len(pieces)); each needle's character span."""
    items = list(pieces)
    positions = [round(depth * len(pieces)) + i for i, depth in enumerate(content.depths)]  # +i: earlier needles
    for position, needle in zip(positions, content.needles):
        items.insert(position, needle)
    lengths = (len(item) + len(separator) for item in items)
    starts = list(itertools.accumulate(lengths, initial=len(content.instruction)))
    context = content.instruction + separator.join(items) + tail
    return context, [(starts[p], starts[p] + len(needle)) for p, needle in zip(positions, content.needles)]


def _render(tokenizer: Any, content: _Content, haystack: Any, window: _Window) -> tuple[str, list[tuple[int, int]]]:
    """The chat-formatted prompt and each needle's character span in it."""
    context, spans = _context(content, haystack.pieces(window), haystack.separator, haystack.tail)
    prompt = _format(tokenizer, context, content.question, content.answer_prefix)
    offset = len(_format(tokenizer, context, content.question, content.answer_prefix, part="head")) - len(context)
    return prompt, [(offset + start, offset + end) for start, end in spans]


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _largest(fits: Callable[[int], bool], guess: int = 0) -> int:
    """The largest n >= 0 with fits(n), where fits(0) holds and fits fails for every n past the answer.
    Gallops from ``guess`` to bracket the answer, then bisects."""
    step = max(1, guess // 64)
    if fits(guess):
        low, high = guess, guess + step
        while fits(high):
            low, high, step = high, high + 2 * step, 2 * step
    else:
        low, high = max(0, guess - step), guess
        while not fits(low):
            low, high, step = max(0, low - 2 * step), low, 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _fit(tokenizer: Any, content: _Content, haystack: Any, budget: int) -> _Window:
    """The haystack window whose prompt fills ``budget`` tokens most closely without passing it."""
    tokens = functools.cache(lambda window: _n_tokens(tokenizer, _render(tokenizer, content, haystack, window)[0]))
    empty = tokens(_Window(0))
    if empty > budget:
        raise ValueError(f"The prompt needs {empty} tokens without any haystack; the budget is {budget} tokens.")
    limit = getattr(haystack, "max_units", None)  # a document has only so many lines
    sampled = SAMPLE_UNITS if limit is None else max(1, min(SAMPLE_UNITS, limit))
    per_unit = max(1.0, (tokens(_Window(sampled)) - empty) / sampled)
    count = _largest(lambda n: (limit is None or n <= limit) and tokens(_Window(n)) <= budget,
                     guess=int((budget - empty) / per_unit))
    return haystack.refine(_Window(count), tokens, budget)


def _token_span(tokenizer: Any, prompt: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) in tokens of the needle prompt[start:end]: the end is the token count of the prompt
    up to the needle's end, the start that minus the needle's own count (a space before the needle
    joins its first token). Counting the prefix together with the needle keeps whitespace before it
    (a blank line) tokenized as in the full prompt."""
    spaced_start = len(prompt[:start].rstrip(" "))
    end_token = _n_tokens(tokenizer, prompt[:end])
    return end_token - _n_tokens(tokenizer, prompt[spaced_start:end]), end_token


def _sample(tokenizer: Any, content: _Content, haystack: Any, length: int, answer_tokens: int) -> NeedleSample:
    window = _fit(tokenizer, content, haystack, length - answer_tokens)
    prompt, char_spans = _render(tokenizer, content, haystack, window)
    input_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    spans = [_token_span(tokenizer, prompt, start, end) for start, end in char_spans]
    for (start, end), needle in zip(spans, content.needles):
        if tokenizer.decode(input_ids[start:end]).strip() != needle:
            raise ValueError(f"Tokens {start}:{end} do not decode to {needle!r}: the tokenizer merges across its edge.")
    return NeedleSample(prompt, input_ids, list(content.answers), spans, list(content.needles), content.depth)


# ----- the tasks ------------------------------------------------------------------------------
def _niah_question(kind: str, queried: list[str], n_answers: int) -> tuple[str, str]:
    """RULER's question and answer prefix, in the singular when one value is expected."""
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    if n_answers == 1:
        noun = kind[:-1]
        return (f"What is the special magic {noun} for {query} mentioned in the provided text?",
                f"The special magic {noun} for {query} mentioned in the provided text is")
    return (f"What are all the special magic {kind} for {query} mentioned in the provided text?",
            f"The special magic {kind} for {query} mentioned in the provided text are")


def niah_sample(
    tokenizer: Any,
    length: int,
    variant: str = "niah_single_1",
    *,
    depth: float | None = None,
    seed: int = 0,
    answer_tokens: int = NIAH_ANSWER_TOKENS,
    haystack: str | None = None,
) -> NeedleSample:
    """One sample of a NIAH variant (a key of ``NIAH_VARIANTS``) of at most ``length - answer_tokens`` tokens.

    ``depth`` in [0, 1] puts every needle at that fraction of the haystack (default: RULER's
    seeded depths). ``haystack``: a document whose non-blank lines replace the variant's haystack
    (the prompt is shorter than ``length`` when the document is)."""
    if variant not in NIAH_VARIANTS:
        raise ValueError(f"Unknown NIAH variant {variant!r}; known: {', '.join(NIAH_VARIANTS)}.")
    spec = NIAH_VARIANTS[variant]
    rng = random.Random(seed)
    keys = _distinct(_MAKERS[spec.key_kind], rng, spec.keys)
    values = {key: [_MAKERS[spec.value_kind](rng) for _ in range(spec.values)] for key in keys}
    queried = rng.sample(keys, spec.queries)
    needles = [NEEDLE.format(kind=spec.value_kind, key=key, value=value) for key in keys for value in values[key]]
    depths = _needle_depths(rng, len(needles), depth)
    answers = [value for key in queried for value in values[key]]
    question, answer_prefix = _niah_question(spec.value_kind, queried, len(answers))
    instruction = INSTRUCTION.replace("numbers", spec.value_kind)  # the instruction, for the value kind
    content = _Content(instruction, needles, depths, question, answer_prefix, answers,
                       depth=depths[keys.index(queried[0]) * spec.values])
    haystack_rng = random.Random(rng.getrandbits(64))
    pieces = _DocumentHaystack(haystack) if haystack is not None else _haystack(spec, haystack_rng, keys)
    return _sample(tokenizer, content, pieces, length, answer_tokens)


def variable_tracking(
    tokenizer: Any,
    length: int,
    *,
    depth: float | None = None,
    seed: int = 0,
    answer_tokens: int = VT_ANSWER_TOKENS,
    hops: int = 4,
) -> NeedleSample:
    """RULER's ``vt``: "VAR A = 12345" then ``hops`` lines "VAR B = VAR A", ... in order in the noise
    haystack; every line is a needle and the answers are all ``hops + 1`` variables, in chain order."""
    rng = random.Random(seed)
    names = _distinct(_variable_name, rng, hops + 1)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {new} = VAR {old}" for old, new in zip(names, names[1:])]
    depths = _needle_depths(rng, len(chain), depth)
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
                     f"{len(names)} variables are assigned the value {value}, they are:")
    content = _Content(VT_INSTRUCTION, chain, depths, question, answer_prefix, names, depth=depths[0])
    return _sample(tokenizer, content, _LineHaystack(itertools.repeat(NOISE_LINE.strip())), length, answer_tokens)


RULER_TASKS: dict[str, Callable[..., NeedleSample]] = {
    **{name: functools.partial(niah_sample, variant=name) for name in NIAH_VARIANTS},
    "vt": variable_tracking,
}


def make_sample(
    task: str,
    tokenizer: Any,
    length: int,
    *,
    seed: int = 0,
    answer_tokens: int | None = None,
    depth: float | None = None,
) -> NeedleSample:
    """One sample of a RULER task; ``answer_tokens`` defaults to RULER's budget for the task (128, vt 30)."""
    if task not in RULER_TASKS:
        raise ValueError(f"Unknown RULER task {task!r}; known tasks: {', '.join(RULER_TASKS)}.")
    extra = {} if answer_tokens is None else {"answer_tokens": answer_tokens}
    return RULER_TASKS[task](tokenizer, length, seed=seed, depth=depth, **extra)


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
