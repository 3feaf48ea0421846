"""``sparse-lens trace``: arguments refused before the model loads (usage errors, exit 2), a --top-k
beyond the prompt, and an output folder left as it was when the run fails."""

import json

import pytest
import torch

import sparse_lens as sl
from sparse_lens.cli.main import main


def refused(arguments, monkeypatch, capsys) -> str:
    """Run ``sparse-lens trace`` with a model loader that fails the test if called; the usage error's text."""
    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sl.HookedSparseTransformer, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exited:
        main(["trace", *arguments, "--device", "cpu"])
    assert exited.value.code == 2  # argparse's usage error, not a FileExistsError after the whole trace
    return capsys.readouterr().err


@pytest.mark.parametrize("out", ["a_file", "a_file/trace"])
def test_an_output_folder_that_is_a_file_or_under_one_is_refused(out, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    message = refused(["--out", str(tmp_path / out)], monkeypatch, capsys)
    assert f"{tmp_path / 'a_file'} is a file" in message
    assert (tmp_path / "a_file").read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [tmp_path / "a_file"]


@pytest.mark.parametrize("estimator", sl.ESTIMATORS)
@pytest.mark.parametrize("causal", [True, False])
def test_a_top_k_beyond_the_key_blocks_keeps_the_same_blocks_as_top_k_equal_to_them(estimator, causal):
    """Why the trace may lower such a top_k to the prompt's key blocks: every estimator keeps the
    same blocks, and the extra slots are empty."""
    from sparse_lens.kernels import estimate_blocks

    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 200, 32, generator=generator), torch.randn(1, 2, 200, 32, generator=generator)
    n_key_blocks = 13  # ceil(200 / 16)
    settings = {} if estimator != "adaptive" else {"estimator_settings": sl.AdaptiveSettings(top_p=0.5, min_blocks=3)}
    chosen = [estimate_blocks(query, key, scale=0.5, **sl.TracingConfig(
                  query_block=16, key_block=16, top_k=top_k, estimator=estimator, causal_selection=causal,
                  **settings).estimator_kwargs())
              for top_k in (n_key_blocks, n_key_blocks + 20)]
    assert torch.equal(chosen[1][..., :n_key_blocks], chosen[0])
    assert (chosen[1][..., n_key_blocks:] == -1).all()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.cli.test_trace import save_tiny_model
    from tests.conftest import tiny_llama_config

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), tiny_llama_config, LlamaForCausalLM)


def test_a_top_k_beyond_the_prompts_key_blocks_is_lowered_to_them(tiny_model_dir, tmp_path, capsys):
    """--top-k 100 on a 14-key-block prompt traces with top_k 14 (the same figures as --top-k 14),
    and says so."""
    arguments = ["trace", "--model", str(tiny_model_dir), "--length", "448", "--query-block", "32", "--key-block", "32",
                 "--max-new-tokens", "8", "--device", "cpu", "--fidelity", "off", "--heatmap-layers", "none"]
    summaries = []
    for top_k in ("100", "14"):
        assert main([*arguments, "--top-k", top_k, "--out", str(tmp_path / top_k)]) == 0
        summaries.append(json.loads((tmp_path / top_k / "summary.json").read_text()))
    assert "top_k 100 is more than the prompt's 14 key blocks: using top_k 14" in capsys.readouterr().out
    lowered, direct = summaries
    assert lowered["length"] == direct["length"] and -(-lowered["length"] // 32) == 14
    assert lowered["config"]["top_k"] == 14
    for key in ("pruned_fraction", "needle_kept_fraction", "needle_layers", "answer", "pattern_bytes"):
        assert lowered[key] == direct[key], key


def test_a_failing_run_leaves_the_output_folder_as_it_was(tiny_model_dir, tmp_path, monkeypatch):
    """The figures are written into a staging folder and moved into --out only once the page and
    summary.json are written: a run failing at its last step leaves an earlier run's folder untouched
    and no staging folder behind; a run that succeeds fills --out and leaves nothing else."""
    from sparse_lens.cli import trace

    out = tmp_path / "trace"
    out.mkdir()
    (out / "summary.json").write_text("an earlier run")
    arguments = ["trace", "--model", str(tiny_model_dir), "--length", "300", "--top-k", "4", "--query-block", "32",
                 "--key-block", "32", "--max-new-tokens", "4", "--device", "cpu", "--fidelity", "off",
                 "--heatmap-layers", "0", "--out", str(out)]
    written = trace.write_trace_page

    def fail(*_, **__):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trace, "write_trace_page", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        main(arguments)
    assert sorted(path.name for path in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == "an earlier run"
    assert sorted(tmp_path.iterdir()) == [out]

    monkeypatch.setattr(trace, "write_trace_page", written)
    assert main(arguments) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(path.name for path in out.iterdir()) == sorted([*summary["figures"], "report.html", "summary.json"])
    assert sorted(tmp_path.iterdir()) == [out]


def test_a_named_error_while_running_is_one_line_and_exit_status_1(tmp_path, capsys):
    """A model that does not exist, or a CUDA device the machine lacks: the named error's message
    (its class named) on stderr and exit status 1, no traceback, nothing written."""
    out = tmp_path / "trace"
    missing = main(["trace", "--model", str(tmp_path / "nope.gguf"), "--device", "cpu", "--out", str(out)])
    lacking = main(["trace", "--device", f"cuda:{torch.cuda.device_count()}", "--out", str(out)])
    err = capsys.readouterr().err
    assert missing == lacking == 1
    assert f"sparse-lens trace: error: ModelSourceError: No model file or directory at {tmp_path / 'nope.gguf'}" in err
    assert "sparse-lens trace: error: InvalidConfigError: device='cuda:" in err
    assert "Traceback" not in err and not out.exists()
