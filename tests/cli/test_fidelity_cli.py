"""``sparse-lens fidelity`` end to end on a tiny random model with a byte-level tokenizer (offline, fast)."""

import json

import pytest
import torch

import sparse_lens as sl
from sparse_lens.cli import fidelity as fidelity_cli
from sparse_lens.cli.main import main
from tests.conftest import tiny_llama_config


def byte_tokenizer():
    """One token per byte (no merges) and an EOS token: exact decoding, so needle spans check out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def test_fidelity_command_writes_fidelity_needles_and_ruler(tmp_path, monkeypatch):
    def tiny_model(name, stream, device):
        tokenizer = byte_tokenizer()
        return sl.HookedSparseTransformer.from_config(tiny_llama_config(vocab_size=len(tokenizer)), stream, tokenizer=tokenizer)

    monkeypatch.setattr(fidelity_cli, "load_model", tiny_model)
    out = tmp_path / "fidelity.json"
    assert main(["fidelity", "--length", "640", "--query-block", "16", "--key-block", "16", "--top-k", "8",
                 "--task", "niah_multikey_1", "--ruler", "2", "--ruler-tasks", "niah_single_1", "vt",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 600 <= result["length"] <= 636 and result["stream"]["top_k"] == 8
    assert 0.3 < result["fidelity"]["pruned_fraction"] < 1 and 0 < result["fidelity"]["mass_recall_mean"] <= 1
    needle = result["needle"]
    assert len(needle["needles"]) == 4 and len(needle["needle_mass"]) == 4  # niah_multikey_1: 4 needles
    assert len(needle["kept"][0]) == 2 and len(needle["kept"][0][0]) == 4  # [needle][layer][head]
    ruler = result["ruler"]
    assert ruler["samples"] == 2 and [r["task"] for r in ruler["records"]] == ["niah_single_1", "vt"]
    assert all(r["needle"] is not None and r["dense_new_tokens"] <= 4 for r in ruler["records"])
    assert 0 <= ruler["dense_accuracy"] <= 1 and 0 <= ruler["sparse_accuracy"] <= 1


def test_fidelity_command_reports_what_it_scored(tmp_path, monkeypatch):
    # The figures of `sparse-lens fidelity --top-k 8` equal sl.fidelity's with top_k 8 on the same model
    # and sample (computed here independently), so a CLI scoring another config than it reports fails.
    from sparse_lens.data import make_sample

    def tiny_model(name, stream, device):
        tokenizer = byte_tokenizer()
        return sl.HookedSparseTransformer.from_config(tiny_llama_config(vocab_size=len(tokenizer)), stream, tokenizer=tokenizer)

    monkeypatch.setattr(fidelity_cli, "load_model", tiny_model)
    out = tmp_path / "fidelity.json"
    assert main(["fidelity", "--length", "400", "--query-block", "16", "--key-block", "16", "--top-k", "8",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stream"]["top_k"] == 8 and result["stream"]["query_block"] == 16

    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=8, keep_qk=False)
    model = tiny_model(None, stream, "cpu")
    sample = make_sample("niah_single_1", model.tokenizer, 400, seed=0, answer_tokens=4)
    assert result["length"] == sample.length
    expected = sl.fidelity(model, torch.tensor([sample.input_ids]), stream)
    for key in ("pruned_fraction", "mass_recall_mean", "mass_recall_p5", "oracle_ratio", "next_token_kl",
                "top1_agreement", "final_top1"):
        assert result["fidelity"][key] == pytest.approx(expected[key], abs=1e-6), key
    with_16 = sl.fidelity(model, torch.tensor([sample.input_ids]), stream.replace(top_k=16))
    assert abs(with_16["pruned_fraction"] - expected["pruned_fraction"]) > 0.05  # the check can tell them apart


def test_fidelity_command_warns_when_top_k_keeps_every_block(tmp_path, monkeypatch, capsys):
    # `sparse-lens fidelity --length 512` with the default 64-token blocks and top_k 16 scored a prompt of
    # 7 key blocks: pruned 0, recall 1, KL 0, without a word
    def tiny_model(name, stream, device):
        tokenizer = byte_tokenizer()
        return sl.HookedSparseTransformer.from_config(tiny_llama_config(vocab_size=len(tokenizer)), stream, tokenizer=tokenizer)

    monkeypatch.setattr(fidelity_cli, "load_model", tiny_model)
    for top_k, warned in (("4", False), ("8", True)):  # 400 tokens: 7 blocks of 64
        assert main(["fidelity", "--length", "400", "--top-k", top_k, "--no-fidelity", "--max-new-tokens", "4",
                     "--out", str(tmp_path / "f.json")]) == 0
        assert ("nothing is pruned" in capsys.readouterr().err) == warned


@pytest.mark.parametrize("out, message", [("folder", "is a directory"), ("a_file/fidelity.json", "a_file is a file")])
def test_an_out_that_cannot_be_written_is_a_usage_error_before_the_model_loads(out, message, tmp_path, monkeypatch,
                                                                               capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("kept")

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(fidelity_cli, "load_model", no_loading)
    with pytest.raises(SystemExit) as exited:
        main(["fidelity", "--out", str(tmp_path / out), "--device", "cpu"])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "kept" and not any((tmp_path / "folder").iterdir())
