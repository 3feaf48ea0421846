"""The HTML report: self-contained, escaped, figures embedded byte for byte."""

import base64
import re

import matplotlib.figure

from sparse_lens.plots import figure_png, save_figure
from sparse_lens.report import Figure, Section, Table, format_value, render_report, write_report


def small_figure():
    fig = matplotlib.figure.Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def small_png(path):
    return save_figure(small_figure(), path, dpi=50)


def test_report_embeds_figures_and_tables(tmp_path):
    png = small_png(tmp_path / "a.png")
    raw = b"\x89PNG\r\n\x1a\n not really a png"
    summary = {"model": "tiny <model>", "pruned_fraction": 0.876543, "correct": True, "answer": None,
               "config": {"top_k": 4, "mode": "sparse"}, "needle_layers": [0, 3]}
    sections = [
        Section("Recall per layer", note="a note & more", figures=[Figure(png, "caption <1>")],
                tables=[Table(["layer", "recall"], [[0, 0.5], [1, None]])]),
        Section("Route", figures=[Figure(raw)], text="L1: 3 -> 2 <- needle"),
    ]
    path = write_report(tmp_path / "report.html", "Trace <b>", summary, sections, note="offline")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(image) for image in images] == [png.read_bytes(), raw]
    # Self-contained: nothing fetched, no scripts.
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    # Everything escaped.
    for text in ("Trace &lt;b&gt;", "tiny &lt;model&gt;", "caption &lt;1&gt;", "a note &amp; more", "3 -&gt; 2 &lt;- needle"):
        assert text in page
    assert "<b>" not in page and "<model>" not in page
    # Summary figures and table cells.
    assert "<th>pruned_fraction</th><td class=\"num\">0.8765</td>" in page
    assert "top_k=4, mode=sparse" in page and "0, 3" in page and ">yes<" in page
    assert page.count("<tr>") == len(summary) + 3  # summary rows + header + two data rows
    assert "<h2>Recall per layer</h2>" in page and "<h2>Route</h2>" in page


def test_format_value():
    assert format_value(None) == format_value(float("nan")) == "\u2013"
    assert format_value(1 / 3) == "0.3333" and format_value(12345678.0) == "1.235e+07"
    assert format_value(False) == "no" and format_value(7) == "7"
    assert format_value({"a": 0.5, "b": [1, 2]}) == "a=0.5, b=1, 2"


def test_render_without_sections():
    page = render_report("t", {"k": 1})
    assert "<h2>Summary</h2>" in page and "data:image" not in page


def test_a_matplotlib_figure_is_embedded_as_its_png(tmp_path):
    fig = small_figure()
    page = render_report("t", {}, [Section("s", figures=[Figure(fig, "live figure")])])
    (image,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(image) == figure_png(fig)
