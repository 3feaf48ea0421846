import json

from sparse_lens.cli.main import main


def test_trace_writes_summary_and_plot(tmp_path):
    out = tmp_path / "trace"
    assert main(["trace", "--length", "448", "--top-k", "4", "--query-block", "32", "--key-block", "32",
                 "--out", str(out), "--max-new-tokens", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "length", "config", "pruned_fraction", "mass_recall_mean", "top1_agreement", "answer",
                "correct", "seconds", "peak_memory_gb", "needle_kept_fraction"):
        assert key in summary, key
    assert 400 <= summary["length"] <= 448 - 8
    assert 0.3 < summary["pruned_fraction"] < 1.0
    assert 0.0 < summary["mass_recall_mean"] <= 1.0 and 0.0 <= summary["top1_agreement"] <= 1.0
    assert isinstance(summary["correct"], bool)
    assert (out / summary["plot"]).stat().st_size > 1000
