"""``sparse-lens trace`` end to end on a tiny random Llama saved as a local model directory (a
byte-level BPE tokenizer trained on the prompt's own text, with a chat template like SmolLM2's),
so the run takes seconds; the default model's loading and prompts are tested in tests/tl and
tests/data."""

import base64
import contextlib
import html
import io
import json
import re
import types

import pytest
import torch

from sparse_lens.cli.main import main
from sparse_lens.cli.trace import auto_top_k
from sparse_lens.data.niah import ADJECTIVES, INSTRUCTION, NOISE_LINE, NOUNS, needle_prompt

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_LAYERS = 3


def save_tiny_model(path, make_config, model_class):
    """A random ``model_class`` of ``make_config(**sizes)`` and a byte-level BPE tokenizer trained on the
    prompt's own text, saved in ``path`` as a local model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [INSTRUCTION, NOISE_LINE * 4, " ".join(ADJECTIVES + NOUNS), "0123456789 special magic numbers is: for"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    config = make_config(vocab_size=len(fast), num_hidden_layers=N_LAYERS, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id)
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), tiny_llama_config, LlamaForCausalLM)


TRACE_ARGS = ["--length", "448", "--top-k", "4", "--query-block", "32", "--key-block", "32", "--max-new-tokens", "8",
              "--device", "cpu"]


@pytest.fixture(scope="module")
def traced(tiny_model_dir, tmp_path_factory):
    """One trace run: its output folder, summary and stderr (progress bars)."""
    out = tmp_path_factory.mktemp("trace")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["trace", "--model", str(tiny_model_dir), *TRACE_ARGS, "--out", str(out),
                     "--heatmap-layers", "0,-1"]) == 0
    return out, json.loads((out / "summary.json").read_text()), stderr.getvalue()


def test_trace_writes_summary_figures_and_report(traced):
    out, summary, err = traced
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
    assert summary["pruned_layers"] == list(range(N_LAYERS))  # no window: every layer is pruned

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
    assert f"mass recall, mean over the {N_LAYERS} pruned layers" in page and "windowed" not in page
    # The page's summary table shows summary.json's final figures (the total time included).
    from sparse_lens.report.html import format_value

    shown = dict(re.findall(r'<tr><th>([a-z0-9_]+)</th><td[^>]*>([^<]*)</td></tr>', page))
    assert "seconds" in shown and shown["seconds"] == format_value(summary["seconds"])
    for key, value in summary.items():
        if key in shown and not isinstance(value, str):  # (text: reading the page turns a "\r" into "\n")
            assert shown[key] == html.escape(format_value(value)), key
    assert page.count("<tr>") >= len(rows) + 1

    # Progress bars over layers: the sparse and dense forwards, fidelity and the figure pass.
    for bar in ("sparse forward", "dense forward", "fidelity", "layers"):
        assert re.search(rf"{bar}: 100%.*{N_LAYERS}/{N_LAYERS}", err), bar


@pytest.fixture(scope="module")
def windowed_model_dir(tmp_path_factory):
    """A tiny Qwen2 whose middle layer has a 64-token sliding window (binding on the traced prompt)."""
    from transformers import Qwen2ForCausalLM

    from tests.conftest import tiny_qwen2_config

    def config(**sizes):
        return tiny_qwen2_config(use_sliding_window=True, sliding_window=64,
                                 layer_types=["full_attention", "sliding_attention", "full_attention"], **sizes)

    return save_tiny_model(tmp_path_factory.mktemp("tiny_windowed"), config, Qwen2ForCausalLM)


def test_trace_recall_is_the_mean_over_the_pruned_layers_only(windowed_model_dir, tmp_path):
    # The windowed layer keeps its whole band (exact, recall 1): the summary's recall leaves it out,
    # lists the layers it is taken over, and the page says so.
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(windowed_model_dir), "--length", "320", "--top-k", "4", "--query-block", "32",
                 "--key-block", "32", "--max-new-tokens", "2", "--device", "cpu", "--out", str(out),
                 "--heatmap-layers", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned_layers"] == [0, 2]
    rows = {row["layer"]: row for row in summary["per_layer"]}
    assert rows[1]["mass_recall_mean"] == pytest.approx(1.0, abs=1e-5) and rows[1]["pruned_fraction"] == 0.0
    pruned = [rows[layer]["mass_recall_mean"] for layer in (0, 2)]
    assert max(pruned) < 0.99  # so a mean taking in the exact layer differs measurably
    assert summary["mass_recall_mean"] == pytest.approx(sum(pruned) / 2, rel=1e-5)
    every_layer = sum(row["mass_recall_mean"] for row in rows.values()) / N_LAYERS
    assert summary["mass_recall_mean"] != pytest.approx(every_layer, rel=1e-3)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "mass recall, mean over the 2 pruned layers" in page
    assert "the windowed layer 1 keeps its whole sliding-window band" in page


@torch.no_grad()
def test_trace_reports_the_figures_recomputed_here(traced, tiny_model_dir):
    # Recompute the summary's headline figures independently: the same prompt, a dense (SDPA) and a
    # sparse forward of the same model, brute-force pair counts and next-token agreement.
    import sparse_lens as sl

    out, summary, _ = traced
    block, top_k = 32, 4
    stream = sl.StreamConfig(query_block=block, key_block=block, top_k=top_k, keep_qk=False)
    model = sl.HookedSparseTransformer.from_pretrained(str(tiny_model_dir), stream=stream, device="cpu")
    sample = needle_prompt(model.tokenizer, 448, depth=0.5, seed=0, answer_tokens=8)
    tokens = torch.tensor([sample.input_ids])
    assert summary["length"] == tokens.shape[1] and summary["config"]["top_k"] == top_k
    sparse_logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    with model.stream_settings(mode="dense"):
        dense_logits = model(tokens)

    seq = tokens.shape[1]
    kept, causal = 0, 0
    for layer in range(N_LAYERS):
        indices = cache[f"blocks.{layer}.attn.hook_pattern"].block_indices[0]  # [head, row, slot]
        for head_rows in indices.tolist():
            for row, blocks in enumerate(head_rows):
                queries = range(row * block, min(seq, (row + 1) * block))
                for b in blocks:
                    if b >= 0:
                        kept += sum(max(0, min(q + 1, (b + 1) * block) - b * block) for q in queries)
        causal += indices.shape[0] * seq * (seq + 1) // 2
    assert summary["pruned_fraction"] == pytest.approx(1 - kept / causal, abs=1e-6)

    first = top_k * block  # query block top_k is the first that sees more than top_k key blocks
    agree = dense_logits[0, first:].argmax(-1) == sparse_logits[0, first:].argmax(-1)
    assert summary["top1_agreement"] == pytest.approx(float(agree.float().mean()), abs=1e-6)
    dense_logp, sparse_logp = dense_logits[0, first:].log_softmax(-1), sparse_logits[0, first:].log_softmax(-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)
    assert summary["next_token_kl"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
    assert 0 < float(agree.float().mean()) < 1  # so top1_agreement cannot pass as the last position's 0 or 1

    generated = model.generate(tokens, max_new_tokens=8)
    answer = model.tokenizer.decode(generated[0, seq:], skip_special_tokens=True)
    assert summary["answer"] == answer and summary["expected"] == sample.answers
    assert summary["correct"] is (sample.answers[0] in answer)


def test_fidelity_where_every_positions_logits_do_not_fit_scores_sampled_positions(traced, tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    # As 16k tokens of a 262k vocabulary on a 24 GB host: collect_dense refuses (ContextTooLongError), so
    # the trace scores evenly spaced positions without a dense trace; the recall figures do not change.
    from sparse_lens.analysis import dense_trace

    _, full, _ = traced
    assert full["fidelity_positions"] == "all"
    no_room_for_logits = types.SimpleNamespace(free_bytes=lambda device: 0)  # observe mode's own check unchanged
    monkeypatch.setattr(dense_trace, "memory", no_room_for_logits)
    monkeypatch.setattr("sparse_lens.cli.trace.SAMPLED_POSITIONS", 50)
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(tiny_model_dir), *TRACE_ARGS, "--out", str(out), "--heatmap-layers", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fidelity_positions"] == 50 and "scoring 50 evenly spaced positions" in capsys.readouterr().out
    assert summary["mass_recall_mean"] == pytest.approx(full["mass_recall_mean"], abs=1e-6)
    assert summary["oracle_ratio"] == pytest.approx(full["oracle_ratio"], abs=1e-6)
    assert 0.0 <= summary["top1_agreement"] <= 1.0 and summary["next_token_kl"] >= 0.0


def test_a_correct_answer_is_reported_correct(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # The random model never answers, so make it: generate returns the expected number.
    import sparse_lens as sl

    def answering(self, tokens, max_new_tokens=32, **_):
        expected = needle_prompt(self.tokenizer, 448, depth=0.5, seed=0, answer_tokens=8).answers[0]
        ids = self.tokenizer(" " + expected, add_special_tokens=False)["input_ids"]
        return torch.cat([tokens, torch.tensor([ids])], dim=1)

    monkeypatch.setattr(sl.HookedSparseTransformer, "generate", answering)
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(tiny_model_dir), *TRACE_ARGS, "--out", str(out), "--fidelity", "off",
                 "--heatmap-layers", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expected"][0] in summary["answer"] and summary["correct"] is True
    log = capsys.readouterr().out
    assert "[4/6] fidelity skipped (--fidelity off)" in log and "dense limit" not in log  # the real reason


def test_fidelity_skip_beyond_the_dense_limit_says_so():
    from sparse_lens.cli.trace import DENSE_FIDELITY_LIMIT, fidelity_skip_reason

    assert f"{DENSE_FIDELITY_LIMIT + 1}-token prompt is beyond the dense limit of {DENSE_FIDELITY_LIMIT}" in \
        fidelity_skip_reason("auto", DENSE_FIDELITY_LIMIT + 1)


def test_trace_of_a_users_document(tiny_model_dir, tmp_path):
    document = tmp_path / "notes.txt"
    document.write_text("".join(f"Line {index} of my own notes: the {NOUNS[index % 20]} is {ADJECTIVES[index % 20]}.\n"
                                for index in range(200)), encoding="utf-8")
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(tiny_model_dir), "--text", str(document), "--length", "320",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), "--fidelity", "off",
                 "--heatmap-layers", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["document"] == str(document) and summary["length"] <= 316
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "notes.txt" in page and page.count("<h2>") >= 4
    # The prompt traced is the document's (with the needle), not the generated haystack.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    own = needle_prompt(tokenizer, 320, answer_tokens=4, haystack=document.read_text(encoding="utf-8"))
    assert "Line 0 of my own notes" in own.prompt and summary["length"] == own.length
    assert needle_prompt(tokenizer, 320, answer_tokens=4).length != own.length
    # --top-k auto with 16-token blocks: about 1 in 16 of the prompt's key blocks, never below the minimum.
    assert summary["config"]["query_block"] == 16
    assert summary["config"]["top_k"] == auto_top_k(summary["length"], 16, 16, 1, 1)


def test_auto_top_k_prunes_most_pairs_at_any_length():
    assert [auto_top_k(length, 16, 16, 1, 1) for length in (320, 1024, 2048, 4096, 131072)] == [4, 4, 8, 16, 512]
    assert auto_top_k(4096, 64, 64, 1, 1) == 4
    # Always 2 searchable blocks beyond the sink, local and diagonal ones (4 query blocks of 16: a
    # band of 4 key blocks, which the 4 local blocks are), capped at the prompt's blocks.
    assert auto_top_k(256, 16, 64, 1, 4) == 4 + 1 + 2 and auto_top_k(1024, 16, 16, 2, 3) == 2 + 3 + 2
    assert auto_top_k(48, 16, 16, 1, 1) == 3 and auto_top_k(16, 16, 16, 1, 1) == 2  # StreamConfig's minimum


def test_a_short_document_is_reported_and_auto_top_k_still_searches(tiny_model_dir, tmp_path, capsys):
    document = tmp_path / "tiny.txt"
    document.write_text("Hello", encoding="utf-8")
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(tiny_model_dir), "--text", str(document), "--length", "300",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), "--fidelity", "off",
                 "--heatmap-layers", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    captured = capsys.readouterr()
    length = summary["length"]
    assert length < 0.9 * 296
    assert f"the prompt has {length} tokens" in captured.out and "300-token" not in captured.out
    assert f"warning: the prompt has only {length} tokens, not the 296 asked for" in captured.err
    assert "tiny.txt is too short" in captured.err
    # top_k auto keeps the sink and local (= diagonal) blocks plus at least 2 the estimator chooses.
    assert summary["config"]["top_k"] >= min(1 + 1 + 2, -(-length // 16))


@pytest.mark.parametrize("arguments, message", [
    (["--text", "/nonexistent.txt"], "no such file"),
    (["--length", "20"], "--length: must be at least"),
    (["--depth", "1.5"], "number in [0, 1]"),
    (["--query-block", "0"], "integer >= 1"),
    (["--top-k", "1", "--sink-blocks", "1", "--local-blocks", "1"], "block settings"),
    (["--heatmap-layers", "first"], "--heatmap-layers: must be 'auto'"),
])
def test_bad_arguments_are_usage_errors_before_the_model_loads(arguments, message, monkeypatch, capsys):
    import sparse_lens as sl

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sl.HookedSparseTransformer, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exited:
        main(["trace", *arguments, "--device", "cpu"])
    assert exited.value.code == 2  # argparse's usage error, not a traceback
    assert message in capsys.readouterr().err


def reload_traced(tiny_model_dir, length: int = 448):
    """The traced model (TRACE_ARGS' blocks and top_k) and prompt, rebuilt here: (model, sample, tokens)."""
    import sparse_lens as sl

    stream = sl.StreamConfig(query_block=32, key_block=32, top_k=4, keep_qk=False)
    model = sl.HookedSparseTransformer.from_pretrained(str(tiny_model_dir), stream=stream, device="cpu")
    sample = needle_prompt(model.tokenizer, length, depth=0.5, seed=0, answer_tokens=8)
    return model, sample, torch.tensor([sample.input_ids])


@torch.no_grad()
def test_trace_summary_fields_are_their_own_figures(traced, tiny_model_dir):
    """The fields the recomputation above does not cover: fidelity's p5 recall and oracle ratio (not
    the mean, not the oracle's recall), overall and per layer, the needle's span, and its kept
    fraction, layers and mass counted by hand from the kept key blocks of the last query block."""
    import sparse_lens as sl

    _, summary, _ = traced
    model, sample, tokens = reload_traced(tiny_model_dir)
    report = sl.fidelity(model, tokens, per_layer=True)
    for key in ("mass_recall_mean", "mass_recall_p5", "oracle_ratio"):
        assert summary[key] == pytest.approx(report[key], rel=1e-5, abs=1e-7), key
    for row, measured in zip(summary["per_layer"], report["layers"], strict=True):
        for key in ("mass_recall_mean", "mass_recall_p5", "oracle_recall_mean"):
            assert row[key] == pytest.approx(measured[key], rel=1e-5, abs=1e-7), (row["layer"], key)
    assert report["mass_recall_p5"] != pytest.approx(report["mass_recall_mean"], rel=1e-3)  # so a mix-up shows
    assert report["oracle_ratio"] != pytest.approx(report["oracle_recall_mean"], rel=1e-3)

    start, end = sample.needle_spans[0]
    assert summary["needle_span"] == [start, end]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    needle_blocks = set(range(start // 32, (end - 1) // 32 + 1))
    last_row = (tokens.shape[1] - 1) // 32
    kept, mass = [], []
    for layer in range(N_LAYERS):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        rows, masses = pattern.block_indices[0, :, last_row].tolist(), pattern.block_mass[0, :, last_row].tolist()
        kept.append([bool(needle_blocks & set(blocks)) for blocks in rows])
        mass.append([sum(m for b, m in zip(blocks, head_mass) if b in needle_blocks)
                     for blocks, head_mass in zip(rows, masses)])
        per_layer = summary["per_layer"][layer]
        assert per_layer["needle_heads_kept"] == pytest.approx(sum(kept[-1]) / len(kept[-1]), abs=1e-6)
        assert per_layer["needle_mass"] == pytest.approx(sum(mass[-1]) / len(mass[-1]), abs=1e-6)
        assert per_layer["needle_mass_max"] == pytest.approx(max(mass[-1]), abs=1e-6)
    flat = [value for layer in kept for value in layer]
    assert summary["needle_kept_fraction"] == pytest.approx(sum(flat) / len(flat), abs=1e-6)
    assert summary["needle_layers"] == [layer for layer in range(N_LAYERS) if any(kept[layer])]
    assert 0 < sum(flat) < len(flat) and sum(flat) * 2 != len(flat)  # neither 0, 1 nor 1/2: mix-ups show


def test_without_fidelity_the_pruned_fraction_is_the_patterns(traced, tiny_model_dir, tmp_path):
    """--fidelity off: pruned_fraction comes from the cached patterns (mean over layers), the same
    figure fidelity reports (checked against brute-force pair counts above); no recall figures."""
    _, full, _ = traced
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(tiny_model_dir), *TRACE_ARGS, "--out", str(out), "--fidelity", "off",
                 "--heatmap-layers", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned_fraction"] == pytest.approx(full["pruned_fraction"], abs=1e-6)
    assert all(summary[key] is None for key in ("mass_recall_mean", "oracle_ratio", "top1_agreement",
                                                 "fidelity_positions"))


@torch.no_grad()
def test_sampled_fidelity_scores_evenly_spaced_pruned_positions(tiny_model_dir, monkeypatch):
    """Where the logits at every position do not fit, fidelity_scores takes its next-token figures at
    SAMPLED_POSITIONS evenly spaced positions from the first pruned one (query block top_k) to the last,
    recomputed here from a dense and a sparse forward; more samples than pruned positions: every one."""
    from sparse_lens.analysis import dense_trace
    from sparse_lens.cli import trace

    model, _, tokens = reload_traced(tiny_model_dir)
    sparse_logits = model(tokens)[0]
    with model.stream_settings(mode="dense"):
        dense_logits = model(tokens)[0]
    seq, first = tokens.shape[1], 4 * 32
    monkeypatch.setattr(dense_trace, "memory", types.SimpleNamespace(free_bytes=lambda device: 0))
    for samples, positions in ((50, torch.linspace(first, seq - 1, 50).long().unique()), (10_000, torch.arange(first, seq))):
        monkeypatch.setattr(trace, "SAMPLED_POSITIONS", samples)
        scores = trace.fidelity_scores(model, tokens)
        assert scores["fidelity_positions"] == len(positions)
        dense_logp, sparse_logp = dense_logits[positions].log_softmax(-1), sparse_logits[positions].log_softmax(-1)
        agree = (dense_logp.argmax(-1) == sparse_logp.argmax(-1)).float().mean()
        assert scores["top1_agreement"] == pytest.approx(float(agree), abs=1e-6)
        kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1).mean()
        assert scores["next_token_kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
