"""Padded batches are refused (PaddingNotSupportedError) at the model's public boundary, where they
would otherwise run silently wrong; unpadded batches keep working."""

import dataclasses

import pytest
import torch

import sparse_lens as sl
from tests.byte_tokenizer import VOCAB_SIZE, byte_tokenizer
from tests.conftest import tiny_llama_config

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the wood. " * 3
SHORT, LONG = TEXT[:86], TEXT[:126] + "zzzz"  # 86 and 130 byte tokens: the short row ends mid block


def tiny_model(**stream_fields) -> sl.HookedSparseTransformer:
    # 16-token blocks, top_k 3: the later query blocks of both rows are pruned.
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3, **stream_fields)
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(vocab_size=VOCAB_SIZE), stream,
                                                  tokenizer=byte_tokenizer())


def non_causal_selection() -> dict:
    """Selection from all of a query block's queries (the pre-issue-9 behaviour), where even right
    padding steers the short row's last query block."""
    names = {field.name for field in dataclasses.fields(sl.StreamConfig)}
    return {"causal_selection": False} if "causal_selection" in names else {}


@torch.no_grad()
def test_padding_would_change_the_short_rows_logits_and_is_refused():
    model = tiny_model(**non_causal_selection())
    alone = model(SHORT)[0]
    n = alone.shape[0]
    # What TransformerBridge would run for model([SHORT, LONG]) (right padding, no mask), and the
    # same batch left-padded (the pads then precede the prompt and are attended to):
    right = model(model.to_tokens([SHORT, LONG]))[0, :n]
    left = model(model.to_tokens([SHORT, LONG], padding_side="left"))[0, -n:]
    assert (right - alone).abs().max() > 1e-3
    assert (left - alone).abs().max() > 1e-3
    with pytest.raises(sl.PaddingNotSupportedError, match="one at a time"):
        model([SHORT, LONG])
    with pytest.raises(sl.PaddingNotSupportedError):
        model.run_with_cache([SHORT, LONG])
    with pytest.raises(sl.PaddingNotSupportedError):
        model.run_with_hooks([LONG, SHORT], fwd_hooks=[])
    with pytest.raises(sl.PaddingNotSupportedError):
        model.generate([SHORT, LONG], max_new_tokens=2)


@torch.no_grad()
def test_a_mask_with_zeros_is_refused_everywhere():
    model = tiny_model()
    tokens = model.to_tokens([LONG, LONG])
    mask = torch.ones_like(tokens)
    mask[0, -5:] = 0
    with pytest.raises(sl.PaddingNotSupportedError):
        model(tokens, attention_mask=mask)
    with pytest.raises(sl.PaddingNotSupportedError):
        model.run_with_cache(tokens, attention_mask=mask)
    with pytest.raises(sl.PaddingNotSupportedError):
        model.generate(tokens, max_new_tokens=2, attention_mask=mask)
    # An all-ones mask is no padding: the same logits as without it.
    assert torch.equal(model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens))


@torch.no_grad()
def test_equal_length_lists_run_each_row_as_alone():
    model = tiny_model()
    other = LONG[::-1]  # same byte length, different text
    batch_logits, cache = model.run_with_cache([LONG, other])
    for row, prompt in enumerate([LONG, other]):
        torch.testing.assert_close(batch_logits[row], model(prompt)[0])
    assert cache["blocks.0.attn.hook_pattern"].block_indices.shape[0] == 2
