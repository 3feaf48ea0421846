"""The Gemma 3 section of docs/fidelity.md (benchmarks/fidelity_render_gemma3.py): all of its files or no section.
(That its figures are the files' is tested with the whole page, tests/benchmarks/test_fidelity_render.py.)"""

import shutil
from pathlib import Path

from benchmarks.fidelity_render import RESULTS
from benchmarks.fidelity_render_gemma3 import FILES, gemma3_section, is_gemma3


def test_no_files_no_section(tmp_path):
    assert gemma3_section(tmp_path) == []
    (tmp_path / "fidelity_e2e_8192.json").write_text("{}")  # SmolLM2's files are not read
    assert gemma3_section(tmp_path) == []


def test_a_missing_file_leaves_the_section_out(tmp_path):
    for path in FILES.values():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(RESULTS / path, tmp_path / path)
    assert gemma3_section(tmp_path)[0].startswith("## A model with sliding-window layers: Gemma 3 270M")
    (tmp_path / FILES["circuits_8k"]).unlink()
    assert gemma3_section(tmp_path) == []


def test_gemma3_files_are_told_apart():
    assert is_gemma3(Path("fidelity_ruler_8192_gemma3_270m_h200.json"))
    assert not is_gemma3(Path("fidelity_ruler_8192_h200.json"))
