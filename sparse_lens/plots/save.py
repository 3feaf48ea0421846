"""The one place figures are written: ``save_figure`` (PNG and any format matplotlib knows).

Every figure in :mod:`sparse_lens.plots` is a ``matplotlib.figure.Figure`` built directly (not
through ``pyplot``), so making one neither selects nor changes the session's backend, opens no
window and registers nothing with pyplot's figure manager: a notebook shows the returned figure
inline, a script saves it.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix, e.g. ``.png``, ``.svg``, ``.pdf``;
    parent folders are created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def figure_png(figure: Figure, *, dpi: int = 120) -> bytes:
    """``figure`` as PNG bytes (e.g. to embed in a page without writing a file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
