"""docs/fidelity.md is what ``python -m benchmarks.fidelity render`` writes from the committed JSON results,
and its tables carry the figures of those files (a changed figure changes the page)."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.fidelity_render import DOCS, RESULTS, render_page


def test_the_committed_page_is_its_rendering():
    # A hand edit of docs/fidelity.md, or a renderer change not rendered into it, fails here:
    # run `python -m benchmarks.fidelity render` and commit the page with its renderer.
    assert render_page(RESULTS).splitlines() == (DOCS / "fidelity.md").read_text().splitlines()


@pytest.fixture
def results(tmp_path):
    """A copy of the JSON results, to change figures in."""
    shutil.copytree(RESULTS, tmp_path / "results", ignore=lambda _, names: [n for n in names if n.endswith((".png", ".txt", ".pt"))])
    return tmp_path / "results"


def edit(results: Path, name: str, change) -> None:
    path = results / name
    run = json.loads(path.read_text())
    change(run)
    path.write_text(json.dumps(run))


def row(run: dict, config: str) -> dict:
    return next(r for r in run["rows"] if r["config"] == config)


def test_the_oracle_and_representative_keys_tables_come_from_their_files(results):
    before = render_page(results)
    assert "| 64-token blocks, top_k 4 | 0.946 | `rescored:64:4` | 0.1175 / 0.1122 | 1.05 |" in before
    assert "| 64-token blocks, top_k 4 | 2 | 4 | 0.946 | 0.707 | 0.187 | 0.935 | 0.1320 | 0.792 |" in before
    edit(results, "fidelity_e2e_8192_oracle.json", lambda run: row(run, "oracle:64:4:causal_selection=False").update(next_token_kl=0.05))
    edit(results, "fidelity_e2e_8192_rk.json", lambda run: row(run, "rescored:64:4:beam=2:representative_keys=4").update(oracle_ratio=0.5))
    after = render_page(results)
    assert "| 64-token blocks, top_k 4 | 0.946 | `rescored:64:4` | 0.1175 / 0.0500 | 2.35 | 0.797 / 0.802 | 0.994 | no |" in after
    assert "| 64-token blocks, top_k 4 | 2 | 4 | 0.946 | 0.707 | 0.187 | 0.500 | 0.1320 | 0.792 |" in after
    assert "loses more, in every layer (0.500 at 64:4" in after  # the prose quotes the file too
    assert "0.1122" not in after and "0.935 at 64:4" not in after


def test_the_gemma3_tables_come_from_their_files(results):
    edit(results, "cpu_2026-11-30e/fidelity_at_length_gemma3_16k_32k_cpu.json",
         lambda run: run["rows"][1].update(oracle_ratio=0.5, seconds=1234.4))
    edit(results, "fidelity_ruler_8192_gemma3_270m_cpu.json",
         lambda run: run["rows"][0]["records"][3].update(sparse_score=0.75, same_output=False))
    after = render_page(results)
    assert "| 0.633 | 0.343 | **0.500** | 0.914 | 0.805 (256 positions) | 1234 s |" in after
    assert "  | vt | `1. 23199 2. 23199 ...` | - | 0 / 0.75 | all (0.90) |" in after
    assert "**0.904**" not in after
