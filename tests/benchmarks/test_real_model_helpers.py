"""The real-checkpoint helpers of the benchmark scripts (benchmarks/common.py, benchmarks/gguf_to_dir.py):
the prose input after the tokenizer's BOS, the clean / corrupted pair of a model with a tokenizer, and
the GGUF-to-directory copy with its equality check."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks.common import bos_tokens, clean_and_corrupted, text_tokens
from sparse_lens.data import prose_tokens
from tests.byte_tokenizer import VOCAB_SIZE, byte_tokenizer

BOS = VOCAB_SIZE  # id of "<bos>" in the tokenizer below


def bos_byte_tokenizer():
    """The byte tokenizer with a ``<bos>`` that it puts before every text, as Gemma's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = byte_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|im_end|>")


def test_text_tokens_put_the_bos_first_only_for_tokenizers_that_add_one():
    plain, with_bos = byte_tokenizer(), bos_byte_tokenizer()
    assert with_bos("x")["input_ids"] == [BOS, *plain("x")["input_ids"]]
    assert bos_tokens(plain) == [] and bos_tokens(with_bos) == [BOS]
    assert text_tokens(plain, 300) == prose_tokens(plain, 300)  # SmolLM2-like: the ids as before
    ids = text_tokens(with_bos, 300, seed=3)
    assert len(ids) == 300 and ids[0] == BOS and ids[1:] == prose_tokens(with_bos, 299, seed=3)
    assert text_tokens(with_bos, 300, bos=False) == prose_tokens(with_bos, 300)


def test_clean_and_corrupted_of_a_model_with_a_tokenizer_is_prose_with_its_first_half_replaced():
    tokenizer = bos_byte_tokenizer()
    model = SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(d_vocab=VOCAB_SIZE + 1))
    clean, corrupted = clean_and_corrupted(model, 400, "cpu", seed=5)
    assert clean.shape == corrupted.shape == (1, 400)
    assert clean[0].tolist() == text_tokens(tokenizer, 400, seed=5)
    assert corrupted[0, 0] == BOS  # the BOS stays
    assert torch.equal(corrupted[:, 200:], clean[:, 200:])  # the second half is the clean one
    assert corrupted[0, 1:200].tolist() == prose_tokens(tokenizer, 199, seed=6)
    assert (corrupted[0, 1:200] != clean[0, 1:200]).float().mean() > 0.5


def test_clean_and_corrupted_of_a_random_init_model_stays_random_ids():
    model = SimpleNamespace(tokenizer=None, cfg=SimpleNamespace(d_vocab=50))
    clean, corrupted = clean_and_corrupted(model, 64, "cpu")
    again, _ = clean_and_corrupted(model, 64, "cpu")
    assert torch.equal(clean, again) and int(clean.max()) < 50
    assert torch.equal(corrupted[:, 32:], clean[:, 32:]) and not torch.equal(corrupted[:, :32], clean[:, :32])


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A save_pretrained directory of a tiny random Llama with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("source")
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_gguf_to_dir_writes_a_copy_that_loads_as_the_source(tiny_source, tmp_path):
    from benchmarks.gguf_to_dir import convert
    from sparse_lens.tl.loading import load_hf_model, resolve_model_source

    seconds = convert(str(tiny_source), tmp_path / "copy")
    assert set(seconds) == {"load_source", "save", "load_copy"}
    assert not (tmp_path / "copy.partial").exists()
    source, _ = load_hf_model(resolve_model_source(str(tiny_source)))
    copy, tokenizer = load_hf_model(resolve_model_source(str(tmp_path / "copy")))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), copy.state_dict().values()))
    ids = torch.tensor([tokenizer("a short text")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(source(ids).logits, copy(ids).logits)


def test_gguf_to_dir_check_names_a_changed_weight_config_or_tokenizer(tiny_source):
    from benchmarks.gguf_to_dir import check_copy
    from sparse_lens.tl.loading import load_hf_model, resolve_model_source

    source, tokenizer = load_hf_model(resolve_model_source(str(tiny_source)))
    copy, copy_tokenizer = load_hf_model(resolve_model_source(str(tiny_source)))
    assert check_copy(source, tokenizer, copy, copy_tokenizer) == []
    with torch.no_grad():
        copy.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-6
    copy.config.rope_theta = 1.0
    copy_tokenizer.chat_template = None
    problems = check_copy(source, tokenizer, copy, copy_tokenizer)
    assert any("model.layers.1.mlp.up_proj.weight" in p for p in problems)
    assert any(p.startswith("config ") for p in problems)
    assert "chat templates differ" in problems
