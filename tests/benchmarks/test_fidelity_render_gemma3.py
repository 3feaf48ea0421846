"""The Gemma 3 section of docs/fidelity.md (benchmarks/fidelity_render_gemma3.py) prints the figures of its JSON
files, and only those."""

import json

from benchmarks.fidelity_render_gemma3 import gemma3_section, is_gemma3


def layer(index, pruned, recall):
    return {"layer": index, "pruned_fraction": pruned, "mass_recall_mean": recall, "mass_recall_p5": recall / 2,
            "oracle_recall_mean": 0.9, "oracle_ratio": recall / 0.9}


def test_no_files_no_section(tmp_path):
    assert gemma3_section(tmp_path) == []
    (tmp_path / "fidelity_e2e_8192.json").write_text("{}")  # SmolLM2's files are not read
    assert gemma3_section(tmp_path) == []


def test_the_tables_carry_the_files_figures(tmp_path):
    figures = {"pruned_fraction": 0.1234, "mass_recall_mean": 0.811, "mass_recall_p5": 0.407, "oracle_recall_mean": 0.842,
               "oracle_ratio": 0.964, "next_token_kl": 0.0431, "top1_agreement": 0.872, "positions_scored": 7936}
    e2e = {"date": "2026-11-30", "machine": "NVIDIA H200", "dtype": "bfloat16", "length": 8192, "command": "python -m benchmarks.fidelity run X",
           "rows": [{"config": "rescored:64:16", **figures},
                    {"config": "stream:64:16", "pruned_fraction": 0.2, "next_token_kl": 0.05, "top1_agreement": 0.9,
                     "positions_scored": 10}]}
    at_length = {"date": "2026-11-30", "device": "NVIDIA H200", "command": "python benchmarks/fidelity_at_length.py Y",
                 "config": {"dtype": "float32"},
                 "stream": {"estimator": "rescored", "query_block": 64, "top_k": 16},
                 "rows": [{"length": 32768, **figures, "seconds": 12.5, "peak_gpu_gb": 40.2,
                           "layers": [layer(0, 0.0, 1.0), layer(5, 0.7771, 0.66), layer(6, 0.0, 1.0)]}]}
    (tmp_path / "fidelity_e2e_8192_gemma3_270m_h200.json").write_text(json.dumps(e2e))
    (tmp_path / "fidelity_at_length_gemma3_32768_h200.json").write_text(json.dumps(at_length))
    text = "\n".join(gemma3_section(tmp_path))
    assert "| 8,192 | `rescored:64:16` | 0.123 | 0.811 | 0.407 | 0.964 | 0.0431 | 0.872 | 7,936 |" in text
    assert "| 8,192 | `stream:64:16` | 0.200 | - | - | - | 0.0500 | 0.900 | 10 |" in text  # --next-token-only row
    assert "| 32,768 | 0.1234 | 0.811 | 0.407 | 0.842 | 0.964 | 0.0431 | 0.872 | 7,936 | 12.5 | 40.2 |" in text
    assert "| 5 | 0.7771 | 0.660 |" in text and "| 0 | 0.0000" not in text  # only the layers that prune
    assert "the other 2: pruned 0, recall 1" in text
    assert "NVIDIA H200, bfloat16 weights" in text and "NVIDIA H200, float32 weights" in text
    assert "`python -m benchmarks.fidelity run X`" in text and "`python benchmarks/fidelity_at_length.py Y`" in text


def test_gemma3_files_are_told_apart():
    from pathlib import Path

    assert is_gemma3(Path("fidelity_ruler_8192_gemma3_270m_h200.json"))
    assert not is_gemma3(Path("fidelity_ruler_8192_h200.json"))
