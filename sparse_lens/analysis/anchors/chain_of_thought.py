"""Chains of thought as input: let the model write one, or take any text, and find its anchors.

- :func:`generate_chain_of_thought`: greedy decoding of a word problem's chain of thought with the
  model itself (its chat template, dense prefill, KV-cached decode), no hub needed; optionally
  kept going past the model's end of turn with "Wait," (budget forcing) for longer reasoning.
- :func:`tokenize_chain_of_thought`: any text (generated, written, pasted) as the model will read
  it: ``prompt + chain_of_thought`` (the prompt of
  ``sparse_lens.data.chain_of_thought.chain_of_thought_prompt`` when a question is given, else the
  text alone), its token ids and its sentences' token spans.
- :func:`chain_of_thought_anchors`: both of the above, then one observe-mode run and the thought
  anchors by each method (``observe_thought_anchors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from sparse_lens.analysis.anchors.salience import PROXIMITY, TOP_HEADS, ThoughtAnchors, observe_thought_anchors
from sparse_lens.analysis.anchors.sentences import Sentences, split_sentences
from sparse_lens.data.chain_of_thought import COT_INSTRUCTION, chain_of_thought_prompt
from sparse_lens.tl.generation import greedy_generate


@dataclass(frozen=True)
class ChainOfThought:
    """A chain of thought as the model reads it.

    Attributes:
        chain_of_thought: the reasoning text.
        question: the question it answers (None: the text was read alone).
        text: ``prompt + chain_of_thought``, what is tokenized.
        input_ids: token ids of ``text`` (no special tokens added: a chat template writes its own).
        sentences: the sentences of ``chain_of_thought`` and their token spans in ``input_ids``.
    """

    chain_of_thought: str
    question: str | None
    text: str
    input_ids: tuple[int, ...]
    sentences: Sentences

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def tokens(self, device: Any = None) -> Tensor:
        """``input_ids`` as a [1, n_tokens] tensor."""
        return torch.tensor([self.input_ids], device=device)


def tokenize_chain_of_thought(
    tokenizer: Any,
    chain_of_thought: str,
    question: str | None = None,
    *,
    instruction: str | None = COT_INSTRUCTION,
) -> ChainOfThought:
    """Any chain-of-thought text, placed after ``question``'s chat-formatted prompt (the one
    :func:`generate_chain_of_thought` uses, same ``instruction``) or alone when ``question`` is
    None, tokenized and cut into sentences (only the chain of thought's own sentences count)."""
    if not chain_of_thought.strip():
        raise ValueError("The chain of thought is empty.")
    prompt = "" if question is None else chain_of_thought_prompt(tokenizer, question, instruction=instruction)
    text = prompt + chain_of_thought
    input_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    sentences = split_sentences(text, tokenizer, char_range=(len(prompt), len(text)))
    return ChainOfThought(chain_of_thought, question, text, input_ids, sentences)


@torch.no_grad()
def generate_chain_of_thought(
    model: Any,
    question: str,
    *,
    max_new_tokens: int = 512,
    min_new_tokens: int = 0,
    continuation: str | Sequence[str] = "Wait,",
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    instruction: str | None = COT_INSTRUCTION,
    verbose: bool = False,
) -> str:
    """The model's own chain of thought for ``question``: greedy decoding after
    ``chain_of_thought_prompt`` (chat template if the tokenizer has one), until the end-of-turn /
    EOS token or ``max_new_tokens``. The prompt is prefilled densely (observe mode) whatever the
    model's ``TracingConfig``; decode steps are dense anyway.

    Small models decoding greedily tend to loop (the same sentence until ``max_new_tokens``).
    ``repetition_penalty`` > 1 and ``no_repeat_ngram_size`` > 0 apply Hugging Face's logits
    processors of those names before the argmax (decoding stays deterministic and goes through
    the same KV-cached greedy loop as ``model.generate``,
    :func:`~sparse_lens.tl.generation.greedy_generate`; the tokens are those of Hugging Face's
    ``generate`` with the same settings).

    ``min_new_tokens`` > 0 forces a longer reasoning ("budget forcing", Muennighoff et al. 2025,
    arXiv 2501.19393): when the model ends its turn before that many tokens, the end token is
    replaced by ``continuation`` (on a new paragraph; a sequence of strings is used in turn, which
    keeps a small greedy model from writing the same paragraph after every "Wait,") and decoding
    goes on (each round prefills the text so far again). Returns the generated text, special
    tokens removed, stripped of surrounding whitespace."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("Generating a chain of thought needs the model's tokenizer (model.tokenizer is None).")
    prompt = chain_of_thought_prompt(tokenizer, question, instruction=instruction)
    tokens = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.cfg.device)
    n_prompt = tokens.shape[1]
    eos = getattr(tokenizer, "eos_token_id", None)
    continuations = [continuation] if isinstance(continuation, str) else list(continuation)
    if not continuations:
        raise ValueError("continuation must be a string or a non-empty sequence of strings.")
    rounds = 0
    while True:
        tokens = _greedy(model, tokens, max_new_tokens - (tokens.shape[1] - n_prompt), eos, repetition_penalty,
                         no_repeat_ngram_size, verbose)
        ended = eos is not None and int(tokens[0, -1]) == eos
        n_new = tokens.shape[1] - n_prompt - int(ended)
        forced = tokenizer("\n\n" + continuations[rounds % len(continuations)], add_special_tokens=False)["input_ids"]
        if not ended or n_new >= min_new_tokens or n_new + len(forced) >= max_new_tokens:
            break
        tokens = torch.cat([tokens[:, :-1], torch.tensor([forced], device=tokens.device)], dim=1)
        rounds += 1
    return tokenizer.decode(tokens[0, n_prompt:], skip_special_tokens=True).strip()


def _greedy(model: Any, tokens: Tensor, max_new_tokens: int, eos: int | None, repetition_penalty: float,
            no_repeat_ngram_size: int, verbose: bool) -> Tensor:
    """Greedy tokens after ``tokens`` with a dense (observe-mode) prefill, through
    ``greedy_generate`` with Hugging Face's repetition processors (in ``generate``'s order) when set."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    with model.stream_settings(mode="observe"):
        return greedy_generate(model.original_model, tokens.to(model.cfg.device), max_new_tokens, eos_token_id=eos,
                               verbose=verbose, logits_processor=processors or None)


def chain_of_thought_anchors(
    model: Any,
    chain_of_thought: str | ChainOfThought,
    question: str | None = None,
    *,
    methods: Sequence[str] = ("sparse", "dense"),
    top_heads: int = TOP_HEADS,
    proximity: int = PROXIMITY,
    instruction: str | None = COT_INSTRUCTION,
    **stream_changes: Any,
) -> tuple[ChainOfThought, dict[str, ThoughtAnchors]]:
    """Thought anchors of any chain-of-thought text (or a :class:`ChainOfThought`): tokenized with
    :func:`tokenize_chain_of_thought`, then one observe-mode run (``stream_changes`` e.g.
    ``query_block=16, key_block=16, top_k=32``) and the anchors by each of ``methods``.
    Returns ``(chain, {method: ThoughtAnchors})``; sentence ``i`` is ``chain.sentences.texts[i]``."""
    chain = (chain_of_thought if isinstance(chain_of_thought, ChainOfThought)
             else tokenize_chain_of_thought(model.tokenizer, chain_of_thought, question, instruction=instruction))
    results = observe_thought_anchors(model, chain.tokens(model.cfg.device), chain.sentences, methods=methods,
                                      top_heads=top_heads, proximity=proximity, **stream_changes)
    return chain, results
