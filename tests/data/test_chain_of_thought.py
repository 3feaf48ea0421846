"""Shipped word problems and the chain-of-thought prompt (tokenizer only, no model)."""

import re

from sparse_lens.data import WORD_PROBLEMS, chain_of_thought_prompt
from sparse_lens.data.chain_of_thought import COT_INSTRUCTION
from tests.byte_tokenizer import byte_tokenizer


def test_word_problems():
    assert len(WORD_PROBLEMS) >= 4 and all(name == problem.name for name, problem in WORD_PROBLEMS.items())
    for problem in WORD_PROBLEMS.values():
        assert problem.question.endswith("?") and problem.answer
    written = WORD_PROBLEMS["field_trip"].chain_of_thought
    lines = written.splitlines()
    assert len(lines) == 60 and all(re.search(r"[.?!]$", line) for line in lines)
    assert WORD_PROBLEMS["field_trip"].answer in lines[-1]


def test_prompt_uses_the_chat_template_or_a_plain_format():
    question = WORD_PROBLEMS["bakery"].question
    prompt = chain_of_thought_prompt(byte_tokenizer(), question)
    assert prompt == f"<|im_start|>user\n{question} {COT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert chain_of_thought_prompt(byte_tokenizer(), question, instruction=None).startswith(f"<|im_start|>user\n{question}<|im_end|>")
    assert chain_of_thought_prompt(byte_tokenizer(chat_template=False), question) == (
        f"Question: {question} {COT_INSTRUCTION}\nAnswer: ")
