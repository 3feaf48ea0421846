"""``sparse-lens trace`` end to end on a tiny random Llama saved as a local model directory (a
byte-level BPE tokenizer trained on the prompt's own text, with a chat template like SmolLM2's),
so the run takes seconds; the default model's loading and prompts are tested in tests/tl and
tests/data."""

import base64
import json
import re

import pytest
import torch

from sparse_lens.analysis.needle import NeedleRecall
from sparse_lens.cli.main import main
from sparse_lens.cli.trace_report import auto_heatmap_layers, parse_layers
from sparse_lens.data.niah import ADJECTIVES, INSTRUCTION, NOISE_LINE, NOUNS

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_LAYERS = 3


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.conftest import tiny_llama_config

    corpus = [INSTRUCTION, NOISE_LINE * 4, " ".join(ADJECTIVES + NOUNS), "0123456789 special magic numbers is: for"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    config: LlamaConfig = tiny_llama_config(vocab_size=len(fast), num_hidden_layers=N_LAYERS,
                                            eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_trace_writes_summary_figures_and_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(tiny_model_dir), "--length", "448", "--top-k", "4", "--query-block", "32",
                 "--key-block", "32", "--out", str(out), "--max-new-tokens", "8", "--device", "cpu",
                 "--heatmap-layers", "0,-1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "length", "config", "pruned_fraction", "mass_recall_mean", "top1_agreement", "answer",
                "correct", "seconds", "peak_memory_gb", "needle_kept_fraction", "per_layer", "report", "figures"):
        assert key in summary, key
    assert 400 <= summary["length"] <= 448 - 8
    assert 0.3 < summary["pruned_fraction"] < 1.0
    assert 0.0 < summary["mass_recall_mean"] <= 1.0 and 0.0 <= summary["top1_agreement"] <= 1.0
    assert isinstance(summary["correct"], bool)
    assert (out / summary["plot"]).stat().st_size > 1000

    # Per layer: fidelity's recall figures merged with the needle's.
    rows = summary["per_layer"]
    assert [row["layer"] for row in rows] == list(range(N_LAYERS))
    for row in rows:
        assert 0.0 < row["mass_recall_mean"] <= 1.0 and 0.0 <= row["needle_heads_kept"] <= 1.0
    mean_recall = sum(row["mass_recall_mean"] for row in rows) / N_LAYERS
    assert mean_recall == pytest.approx(summary["mass_recall_mean"], rel=1e-5)

    # Figures: the recall per layer, needle, route, salience and the block heatmaps asked for.
    names = set(summary["figures"])
    assert names == {"layers.png", "needle_blocks.png", "route.png", "salience.png", "blocks_layer00.png",
                     f"blocks_layer{N_LAYERS - 1:02d}.png"}
    assert summary["heatmap_layers"] == [0, N_LAYERS - 1]
    assert summary["n_sentences"] > 10 and summary["needle_salience_rank"] >= 1

    # The report embeds every figure byte for byte, with the summary figures and the per-layer table.
    page = (out / summary["report"]).read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(names)
    assert {base64.b64decode(image) for image in embedded} == {(out / name).read_bytes() for name in names}
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    for heading in ("Summary", "Recall per layer", "Needle at the answer position", "Route from the answer to the needle",
                    "Sentence salience", "Block heatmaps"):
        assert f"<h2>{heading}</h2>" in page
    for key in ("pruned_fraction", "mass_recall_mean", "top1_agreement", "next_token_kl", "correct"):
        assert f"<th>{key}</th>" in page
    assert f"{summary['pruned_fraction']:.4g}" in page and "Best path" in page
    assert page.count("<tr>") >= len(rows) + 1

    # Progress bars over layers: the sparse and dense forwards, fidelity and the figure pass.
    err = capsys.readouterr().err
    for bar in ("sparse forward", "dense forward", "fidelity", "layers"):
        assert re.search(rf"{bar}: 100%.*{N_LAYERS}/{N_LAYERS}", err), bar


def test_heatmap_layers_argument():
    assert parse_layers("auto", 30) is None
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("none", 3) == []
    assert parse_layers("5,-1,0,5", 30) == [0, 5, 29]
    with pytest.raises(ValueError):
        parse_layers("30", 30)


def test_auto_heatmap_layers_are_the_ends_and_where_the_needle_is_read():
    mass = torch.zeros(12, 4)
    mass[6, 2] = 0.5
    recall = NeedleRecall(mass > 0, mass, needle_blocks=(3,), query_block=9)
    assert auto_heatmap_layers(recall, None, 12) == [0, 6, 11]
