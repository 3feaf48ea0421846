"""Word problems and chains of thought, without a hub: a few shipped problems, one written chain
of thought, and the prompt a model generates its own from.

The problems and the written chain of thought are original text written for sparse_lens and
dedicated to the public domain (CC0 1.0), like the essays in ``texts/essays.txt``.

- ``WORD_PROBLEMS``: name -> :class:`WordProblem` (question, expected answer; ``field_trip`` also
  has a written 60-sentence chain of thought that plans, computes, checks and backtracks).
- :func:`chain_of_thought_prompt`: the chat-formatted prompt (the tokenizer's chat template, if it
  has one) after which a model writes its chain of thought; the analysis reads
  ``prompt + chain_of_thought``. Generation itself needs the model:
  ``sparse_lens.analysis.anchors.chain_of_thought.generate_chain_of_thought``.

Imports nothing from the TransformerLens layer (a tokenizer is any callable Hugging Face tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COT_INSTRUCTION = "Think step by step, then give the final answer."


@dataclass(frozen=True)
class WordProblem:
    """A word problem: its ``question``, the ``answer`` (a string the final answer should contain),
    and optionally a written ``chain_of_thought`` that solves it."""

    name: str
    question: str
    answer: str
    chain_of_thought: str | None = None


# Written for sparse_lens (plain English, 60 sentences, one per line): planning, computing,
# checking, backtracking. About 1,300 tokens with SmolLM2's chat template.
FIELD_TRIP_CHAIN_OF_THOUGHT = """Let me start by restating the problem so that I do not miss anything.
There are 187 students and 14 teachers, so 201 people need to travel.
A bus holds 45 people and costs 320 dollars.
A van holds 12 people and costs 110 dollars.
Every vehicle must carry at least one teacher, so we can use at most 14 vehicles.
My plan is to compare the cost per seat of the two vehicles first, then fill up with the cheaper one, and finally deal with the people who are left over.
For a bus, the cost per seat is 320 divided by 45, which is about 7.11 dollars.
For a van, the cost per seat is 110 divided by 12, which is about 9.17 dollars.
So buses are cheaper per seat, and we should use as many buses as makes sense.
Four buses hold 4 times 45, which is 180 people.
That leaves 201 minus 180, which is 21 people.
Two vans carry 24 people, which is enough for the 21 who are left.
The cost would be 4 times 320 plus 2 times 110.
That is 1280 plus 220, so 1500 dollars.
But wait, maybe five buses are cheaper than four buses and two vans.
Five buses hold 225 people, which covers everyone.
Five buses cost 5 times 320, which is 1600 dollars.
That is more than 1500, so four buses and two vans is better so far.
Hmm, what about fewer buses and more vans?
Three buses hold 135 people, leaving 66 people.
Sixty-six people need 6 vans, since 5 vans only hold 60.
The cost is 3 times 320 plus 6 times 110, which is 960 plus 660, or 1620 dollars.
That is worse.
Let me also check the teacher rule for the best option.
Four buses and two vans are six vehicles, and we have 14 teachers, so every vehicle gets a teacher.
Actually, wait, I should double check the number of people.
The problem says 187 students and 14 teachers.
Adding them gives 201, so that part was right.
Now let me reconsider whether a cheaper plan could leave a bus partly empty.
With four buses we have 180 seats and 21 people left over.
One van holds 12, so one van is not enough for 21 people.
What if we used four buses and one van, and squeezed the extra people in?
No, that is not allowed, because the seat limits are strict.
So the leftover 21 people need two vans or one more bus.
One more bus costs 320 dollars, while two vans cost 220 dollars.
Two vans are cheaper, so we keep four buses and two vans.
Let me step back and treat the problem as a small optimization.
We want to minimize 320 times the buses plus 110 times the vans, with at least 201 seats.
We also need the number of vehicles to be at most 14.
For each number of buses, the best number of vans is the smallest one that covers the rest.
With zero buses, we need 17 vans, which breaks the limit of 14 vehicles.
With one bus, 156 people are left, which needs 13 vans, so 14 vehicles in total.
That costs 320 plus 1430, which is 1750 dollars.
With two buses, 111 people are left, which needs 10 vans, costing 640 plus 1100, or 1740 dollars.
With three buses, we found 1620 dollars.
With four buses, we found 1500 dollars.
With five buses, we found 1600 dollars.
So the minimum over all options is 1500 dollars with four buses and two vans.
Wait, I think I made an error with two buses.
Two buses hold 90 people, and 201 minus 90 is 111.
Then 111 divided by 12 is 9.25, so we need 10 vans.
Okay, the number of vans was right, and the cost of 1740 dollars stands.
Let me verify the final answer once more from scratch.
Four buses carry 180 people and two vans carry up to 24 people.
Together that is 204 seats for 201 people, so three seats stay empty.
The buses cost 1280 dollars and the vans cost 220 dollars.
The total is 1500 dollars.
Each of the six vehicles has at least one of the 14 teachers on board.
Therefore the cheapest plan is four buses and two vans.
The answer is 1500 dollars."""

WORD_PROBLEMS: dict[str, WordProblem] = {
    problem.name: problem
    for problem in (
        WordProblem(
            "field_trip",
            "A school is taking 187 students and 14 teachers on a field trip. A bus holds 45 people and costs "
            "320 dollars. A van holds 12 people and costs 110 dollars. Every vehicle needs at least one teacher "
            "on board. What is the cheapest way to take everyone, and how much does it cost?",
            "1500",
            FIELD_TRIP_CHAIN_OF_THOUGHT,
        ),
        WordProblem(
            "bakery",
            "A bakery bakes 24 muffins every hour for 6 hours. It sells them in boxes of 4 for 10 dollars a box. "
            "In the evening a cafe buys half of the boxes. How much does the cafe pay?",
            "180",
        ),
        WordProblem(
            "trains",
            "Two towns are 300 kilometres apart. At 9:00 a train leaves each town towards the other, one at "
            "70 kilometres per hour and the other at 80 kilometres per hour. At what time do the trains meet, "
            "and how far from the first town?",
            "11:00",
        ),
        WordProblem(
            "garden",
            "A rectangular garden is 18 metres long and 12 metres wide. A path 1 metre wide runs along the "
            "inside of its edge. Tiles for the path cost 15 dollars per square metre. How much do the tiles cost?",
            "840",
        ),
        WordProblem(
            "savings",
            "Maya has no money and saves 15 dollars every week. Her brother has 60 dollars and spends 5 dollars "
            "every week. After how many weeks does Maya have more money than her brother?",
            "4",
        ),
    )
}


def chain_of_thought_prompt(tokenizer: Any, question: str, *, instruction: str | None = COT_INSTRUCTION) -> str:
    """The text after which the model writes its chain of thought: the user turn ``question``
    (followed by ``instruction`` unless it is None or empty) and the start of the assistant turn,
    in the tokenizer's chat template (``add_generation_prompt=True``, the template's default
    system prompt included); without a template, ``"Question: ...\nAnswer: "``.

    Tokenize it (and ``prompt + chain_of_thought``) with ``add_special_tokens=False``: a chat
    template writes its special tokens itself."""
    user = f"{question} {instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {user}\nAnswer: "
