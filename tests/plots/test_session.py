"""Figures respect the user's matplotlib session: no backend is chosen or changed, pyplot is never
imported, and every figure is a plain ``matplotlib.figure.Figure`` that the caller owns."""

import os
import subprocess
import sys
from pathlib import Path

import sparse_lens

SCRIPT = """
import sys, matplotlib
before = matplotlib.rcParams._get_backend_or_none()
import torch
import sparse_lens.cli.trace, sparse_lens.report
from sparse_lens.plots import layer_recall_figure, needle_recall_figure, save_figure
from sparse_lens.analysis.needle import NeedleRecall
from matplotlib.figure import Figure
fig = layer_recall_figure([{"layer": 0, "pruned_fraction": 0.5}, {"layer": 1, "pruned_fraction": 0.7}])
recall = NeedleRecall(kept=torch.ones(2, 3, dtype=torch.bool), mass=torch.rand(2, 3), needle_blocks=(1,), query_block=3)
assert isinstance(fig, Figure) and isinstance(needle_recall_figure(recall), Figure)
path = save_figure(fig, sys.argv[1] + "/sub/layers.svg")
assert path.read_text().lstrip().startswith("<?xml") and path.stat().st_size > 2000
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert matplotlib.rcParams._get_backend_or_none() == before, "the backend was changed"
print("ok")
"""


def test_plotting_touches_neither_pyplot_nor_the_backend(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            env={key: value for key, value in os.environ.items() if key != "MPLBACKEND"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_no_module_selects_a_backend():
    package = Path(sparse_lens.__file__).parent
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if "matplotlib.use(" in path.read_text() or "import matplotlib.pyplot" in path.read_text()]
    assert offenders == []
