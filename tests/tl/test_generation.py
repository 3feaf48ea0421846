import pytest
import torch

import sparse_lens as sl
from tests.byte_tokenizer import VOCAB_SIZE, byte_tokenizer
from tests.conftest import sparse_and_dense, tiny_llama_config, tiny_qwen2_config


def test_cached_greedy_decode_equals_recomputing_the_whole_sequence():
    # With every block kept, sparse prefill + dense cached decode must equal greedy decoding by
    # re-running the full forward pass for each new token.
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    prompt = torch.randint(0, 90, (2, 70), generator=torch.Generator().manual_seed(0))
    generated = sparse.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, sparse(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


@pytest.fixture(scope="module")
def text_model():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=3)
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(vocab_size=VOCAB_SIZE), stream,
                                                  tokenizer=byte_tokenizer())


PROMPTS = ["a tiny prompt of forty bytes, or so it is", "b tiny prompt of forty bytes, or so it is"]


def test_every_input_kind_of_transformer_lens_generate(text_model):
    model = text_model
    rows = model.to_tokens(PROMPTS)  # [2, pos]: equal lengths, no padding
    expected = model.generate(rows, max_new_tokens=3, stop_at_eos=False)
    assert expected.shape == (2, rows.shape[1] + 3)

    one = model.generate(rows[1], max_new_tokens=3, stop_at_eos=False)  # [pos] in, [pos + new] out
    assert one.ndim == 1 and torch.equal(one, expected[1])

    texts = model.generate(PROMPTS, max_new_tokens=3, stop_at_eos=False)
    assert texts == [model.tokenizer.decode(row) for row in expected]
    assert model.generate(PROMPTS[:1], max_new_tokens=3, stop_at_eos=False) == texts[:1]  # a list stays a list
    assert model.generate(PROMPTS[0], max_new_tokens=3, stop_at_eos=False) == texts[0]
    assert model.generate(rows, max_new_tokens=3, stop_at_eos=False, return_type="str") == texts
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=3, stop_at_eos=False, return_type="tokens"), expected)


def test_unsupported_generate_inputs_raise_named_errors(text_model):
    model = text_model
    with pytest.raises(sl.PaddingNotSupportedError):
        model.generate([PROMPTS[0], PROMPTS[0] + " longer"], max_new_tokens=2)
    with pytest.raises(sl.ShapeError, match=r"\[pos\] or \[batch, pos\]"):
        model.generate(torch.zeros(1, 2, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(sl.ShapeError, match="integer token ids"):
        model.generate(torch.zeros(1, 4), max_new_tokens=2)
    with pytest.raises(TypeError, match="a string, a non-empty list of strings"):
        model.generate([], max_new_tokens=2)
    with pytest.raises(TypeError, match="greedy decoding only"):
        model.generate(PROMPTS[0], max_new_tokens=2, do_sample=True)


@pytest.mark.parametrize("tokens,match", [
    (torch.zeros(1, 2, 40, dtype=torch.long), r"\[pos\] or \[batch, pos\]"),  # was an EinopsError in attention
    (torch.zeros(1, 0, dtype=torch.long), r"\[pos\] or \[batch, pos\]"),  # was a bare IndexError
    (torch.zeros(1, 40), "integer token ids"),  # was a RuntimeError
    (torch.full((1, 40), VOCAB_SIZE), r"\[0, d_vocab"),  # past the vocabulary: a device-side assert on CUDA
    (torch.full((1, 40), -1), r"\[0, d_vocab"),
])
def test_bad_token_tensors_raise_a_named_error_in_the_forward(text_model, tokens, match):
    with pytest.raises(sl.ShapeError, match=match):
        text_model(tokens)
    with pytest.raises(sl.ShapeError, match=match):
        text_model.run_with_cache(tokens)
    assert text_model(torch.full((1, 40), VOCAB_SIZE - 1)).shape == (1, 40, VOCAB_SIZE)  # the last id is valid


def test_negative_max_new_tokens_is_a_named_error():
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), sl.TracingConfig(query_block=8, key_block=8, top_k=2))
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(0))
    with pytest.raises(sl.InvalidConfigError, match="max_new_tokens"):
        model.generate(tokens, max_new_tokens=-1)
    assert model.generate(tokens, max_new_tokens=0).shape == tokens.shape


def test_greedy_generate_asks_for_the_last_position_only_and_keeps_the_tokens():
    # The prefill must not build [batch, pos, d_vocab] logits (32 GiB at 32k tokens of a 262k
    # vocabulary): each forward returns one position, and the tokens equal full-forward decoding.
    from sparse_lens.tl.generation import greedy_generate

    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    prompt = torch.randint(0, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    shapes = []
    handle = sparse.original_model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        with torch.no_grad():
            generated = greedy_generate(sparse.original_model, prompt, 4)
    finally:
        handle.remove()
    vocab = sparse.cfg.d_vocab
    assert shapes == [(2, 1, vocab)] * 4  # the prefill included
    expected = prompt
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, sparse(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)
