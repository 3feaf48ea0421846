"""The figures and the HTML report of a needle trace (what ``sparse-lens trace`` writes).

The command runs the model; this module composes what it shows. From one sparse run's per-layer patterns (and fidelity's per-layer figures when dense was
affordable): a per-layer pass (with a progress bar) that collects each layer's figures, the
sentence salience of the prompt and the block heatmaps of chosen layers; then the route graph,
the recall-per-layer and needle figures, and ``report.html`` embedding them all. Nothing here
builds a T x T array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sparse_lens.analysis import (
    Route,
    Sentences,
    ThoughtAnchors,
    anchors_from_vertical_scores,
    route_to_needle,
    split_sentences,
    vertical_scores_sparse,
)
from sparse_lens.analysis.needle import NeedleRecall
from sparse_lens.data.niah import INSTRUCTION, NeedleSample
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.plots import plot_block_heatmap, plot_layer_recall, plot_needle_recall, plot_route, plot_salience
from sparse_lens.report import Figure, Section, Table, write_report

SALIENCE_PROXIMITY = 4  # the thought-anchors default: receivers at least 4 sentences later
HEATMAP_LAYERS_AUTO = 4
QUESTION_START = "What is the special magic number"  # data.niah's question


def parse_layers(text: str, n_layers: int) -> list[int] | None:
    """Heatmap layers (``sparse-lens trace --heatmap-layers``): ``"auto"`` (None: chosen from the trace), ``"all"``, ``"none"`` or a
    comma list of layers (negative ones count from the end)."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text == "all":
        return list(range(n_layers))
    if text in ("none", ""):
        return []
    layers = []
    for part in text.split(","):
        layer = int(part)
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"--heatmap-layers: layer {layer} outside a {n_layers}-layer model.")
        layers.append(layer % n_layers)
    return sorted(set(layers))


def auto_heatmap_layers(recall: NeedleRecall, route: Route | None, n_layers: int) -> list[int]:
    """The first and last layers, the layer giving the needle the most mass at the answer and the
    layer where the best route through the needle enters it."""
    layers = {0, n_layers - 1, int(recall.mass.mean(-1).argmax())}
    if route is not None and route.best_entry is not None:
        layers.add(route.best_entry.entry_layer)
    return sorted(layers)[:HEATMAP_LAYERS_AUTO]


def describe(stream: Any) -> str:
    """The trace's settings (a ``StreamConfig``) in one line, for the report's summary."""
    selection = "causal selection" if getattr(stream, "causal_selection", False) else "selection by the whole query block"
    return (f"{stream.estimator} estimator, {stream.query_block}-token query and {stream.key_block}-token key blocks, "
            f"top_k {stream.top_k} (incl. {stream.sink_blocks} sink, {stream.local_blocks} local), {selection}")


@dataclass
class LayerPass:
    """What the per-layer pass collected."""

    rows: list[dict[str, Any]]
    heatmaps: dict[int, Path]
    anchors: ThoughtAnchors | None


def layer_pass(
    patterns: Sequence[BlockSparsePattern],
    recall: NeedleRecall,
    fidelity_layers: Sequence[dict[str, Any]],
    route: Route | None,
    sentences: Sentences | None,
    heatmap_layers: Sequence[int],
    sample: NeedleSample,
    out: Path,
) -> LayerPass:
    """One pass over the layers, with a progress bar: each layer's figures (pruned fraction, the
    fidelity recall figures if measured, the needle at the answer, the best route entering the
    needle there), its sentence vertical scores, and its block heatmap if asked for."""
    n_heads = recall.kept.shape[1]
    entries = {path.entry_layer: path.log_score for path in route.needle_entries} if route is not None else {}
    by_layer = {row["layer"]: row for row in fidelity_layers}
    rows, heatmaps, vertical = [], {}, []
    chosen = set(heatmap_layers)
    for layer in tqdm(range(len(patterns)), desc="layers", unit="layer"):
        pattern = patterns[layer]
        measured = by_layer.get(layer, {})
        rows.append({
            "layer": layer,
            "pruned_fraction": pattern.pruned_fraction(),
            "mass_recall_mean": measured.get("mass_recall_mean"),
            "mass_recall_p5": measured.get("mass_recall_p5"),
            "oracle_recall_mean": measured.get("oracle_recall_mean"),
            "needle_heads_kept": float(recall.kept[layer].float().mean()),
            "needle_heads": f"{int(recall.kept[layer].sum())}/{n_heads}",
            "needle_mass": float(recall.mass[layer].mean()),
            "needle_mass_max": float(recall.mass[layer].max()),
            "needle_route_log_mass": entries.get(layer),
        })
        if sentences is not None:
            vertical.append(vertical_scores_sparse(pattern, list(sentences), proximity=SALIENCE_PROXIMITY))
        if layer in chosen:
            heatmaps[layer] = plot_block_heatmap(
                pattern, out / f"blocks_layer{layer:02d}.png", key_span=sample.needle_spans[0], query_position=-1,
                title=f"Layer {layer}: kept block mass per head (max pooled); needle keys dashed, answer row orange",
            )
    anchors = None
    if vertical:
        anchors = anchors_from_vertical_scores(torch.stack(vertical), proximity=SALIENCE_PROXIMITY, method="sparse")
    return LayerPass(rows, heatmaps, anchors)


def context_range(prompt: str) -> tuple[int, int]:
    """Characters of the document part of a needle prompt (the instruction and the haystack),
    leaving out the chat template and the question; the whole prompt if they are not found."""
    start = prompt.find(INSTRUCTION)
    end = prompt.find(QUESTION_START, max(start, 0))
    return (max(start, 0), end if end > start else len(prompt))


def prompt_sentences(sample: NeedleSample, tokenizer: Any) -> Sentences | None:
    """The sentences of the prompt's document part on its tokens (None if too few to score)."""
    sentences = split_sentences(sample.prompt, tokenizer, char_range=context_range(sample.prompt))
    return sentences if len(sentences) > SALIENCE_PROXIMITY + 1 else None


def needle_sentences(sentences: Sentences, needle_span: tuple[int, int]) -> list[int]:
    """Indices of the sentences overlapping the needle's tokens."""
    start, end = needle_span
    return [index for index, (a, b) in enumerate(sentences) if a < end and start < b]


def salience_rank(anchors: ThoughtAnchors, sentences: Sequence[int]) -> int | None:
    """1-based rank of the most salient of ``sentences`` among the scored sentences."""
    order = anchors.anchors(anchors.n_sentences)
    ranks = [order.index(index) + 1 for index in sentences if index in order]
    return min(ranks) if ranks else None


@dataclass
class TraceFigures:
    """What :func:`write_trace_figures` made: the summary entries the figures add (``per_layer``,
    the needle route and salience figures, the file names) and the report's sections."""

    added: dict[str, Any]
    sections: list[Section]


def write_trace_figures(
    out: Path,
    summary: dict[str, Any],
    *,
    patterns: Sequence[BlockSparsePattern],
    recall: NeedleRecall,
    fidelity_layers: Sequence[dict[str, Any]],
    sample: NeedleSample,
    tokenizer: Any,
    heatmap_layers: list[int] | None,
) -> TraceFigures:
    """Write every figure into ``out``; return the summary entries they add and the report's
    sections, for :func:`write_trace_page` (called once the summary's figures are final, so the
    page and ``summary.json`` show the same ones). ``summary`` holds ``pruned_layers`` (the layers
    its recall figures are taken over, see :func:`recall_scope`) when ``mass_recall_mean`` is set."""
    needle_span = tuple(sample.needle_spans[0])
    length = sample.length
    route = route_to_needle(patterns, needle_span, answer_position=-1)
    if heatmap_layers is None:
        heatmap_layers = auto_heatmap_layers(recall, route, len(patterns))
    sentences = prompt_sentences(sample, tokenizer)
    layers = layer_pass(patterns, recall, fidelity_layers, route, sentences, heatmap_layers, sample, out)

    figures = {
        "layers": plot_layer_recall(layers.rows, out / "layers.png", title=f"Recall per layer ({length} tokens)"),
        "needle": plot_needle_recall(recall, out / "needle_blocks.png",
                                     title=f"Needle blocks kept at the answer position ({length} tokens)"),
        "route": plot_route(route, out / "route.png"),
    }
    needle_sentence_ids: list[int] = []
    rank = None
    if layers.anchors is not None:
        needle_sentence_ids = needle_sentences(sentences, needle_span)
        rank = salience_rank(layers.anchors, needle_sentence_ids)
        figures["salience"] = plot_salience(
            layers.anchors, out / "salience.png", sentences=sentences.texts, highlight=needle_sentence_ids,
            highlight_label="needle sentence",
            title=f"Sentence salience over the document ({layers.anchors.n_sentences} sentences, sparse block mass)",
        )
    best_entry = route.best_entry
    added = {
        "needle_route_entry_layer": best_entry.entry_layer if best_entry is not None else None,
        "needle_route_log_mass": best_entry.log_score if best_entry is not None else None,
        "best_route_log_mass": route.best.log_score if route.best is not None else None,
        "needle_salience_rank": rank,
        "n_sentences": layers.anchors.n_sentences if layers.anchors is not None else None,
        "heatmap_layers": sorted(layers.heatmaps),
        "figures": [path.name for path in figures.values()] + [path.name for path in layers.heatmaps.values()],
        "report": "report.html",
        "per_layer": layers.rows,
    }
    return TraceFigures(added, _sections(summary, layers, figures, route, sentences, needle_sentence_ids))


def recall_scope(pruned_layers: Sequence[int], n_layers: int) -> str:
    """What the summary's recall figures average over, in words: ``mass_recall_mean`` (and
    ``mass_recall_p5``, ``oracle_ratio``) pool the pruned query blocks of the ``pruned_layers`` only
    (those whose blocks the estimator chooses); the other layers of the ``n_layers`` keep their whole
    sliding-window band, are exact and are left out."""
    pruned = set(pruned_layers)
    exact = [layer for layer in range(n_layers) if layer not in pruned]
    text = (f"mass_recall_mean (mass recall, mean over the {len(pruned)} pruned layer{'' if len(pruned) == 1 else 's'}: "
            "pruned_layers), mass_recall_p5 and oracle_ratio pool the query blocks where pruning happens in those "
            "layers only")
    if len(exact) == 1:
        text += f"; the windowed layer {exact[0]} keeps its whole sliding-window band, is exact (recall 1) and is left out"
    elif exact:
        text += (f"; the {len(exact)} windowed layers ({', '.join(map(str, exact))}) keep their whole sliding-window "
                 "band, are exact (recall 1) and are left out")
    return text + "."


def write_trace_page(out: Path, summary: dict[str, Any], figures: TraceFigures) -> None:
    """Write ``out/report.html``: ``summary`` (with ``figures.added``) as the headline table, then
    the figures' sections."""
    headline = {key: value for key, value in {**summary, **figures.added}.items()
                if key not in ("per_layer", "figures", "plot", "report", "config")}  # config: in summary.json
    note = f"Model {summary['model']}; figures are also PNG files beside this page."
    if summary.get("mass_recall_mean") is not None:
        note += " " + recall_scope(summary["pruned_layers"], len(figures.added["per_layer"]))
    write_report(out / "report.html", f"sparse-lens trace: {summary['length']}-token needle in a haystack", headline,
                 figures.sections, note=note)


def _sections(summary, layers: LayerPass, figures: dict[str, Path], route: Route, sentences, needle_ids) -> list[Section]:
    table = Table(
        ["layer", "pruned", "mass recall mean", "mass recall p5", "oracle recall", "heads keeping needle",
         "needle mass (mean)", "needle mass (max)", "best route via needle entering here (log-mass)"],
        [[row["layer"], row["pruned_fraction"], row["mass_recall_mean"], row["mass_recall_p5"],
          row["oracle_recall_mean"], row["needle_heads"], row["needle_mass"], row["needle_mass_max"],
          row["needle_route_log_mass"]] for row in layers.rows],
    )
    fidelity_note = ("Mass recall: share of the dense softmax mass inside the kept blocks, over the query blocks "
                     "that are pruned; oracle: the same for the exact top-k blocks. In the summary, "
                     + recall_scope(summary["pruned_layers"], len(layers.rows))
                     if summary.get("mass_recall_mean") is not None
                     else "Fidelity against dense attention was skipped, so only the needle figures are shown.")
    sections = [
        Section("Recall per layer", note=fidelity_note, figures=[Figure(figures["layers"], "recall per layer")],
                tables=[table]),
        Section("Needle at the answer position",
                note="Per layer and head: the attention mass the answer position's query block puts on the "
                     "needle's kept key blocks (boxes: a needle block is kept).",
                figures=[Figure(figures["needle"], "needle blocks per layer and head")]),
        Section("Route from the answer to the needle",
                note="Exact layer-wise routes over the kept blocks (edge weight: block mass averaged over heads; "
                     "route scores: natural log of the product of the edge weights).",
                figures=[Figure(figures["route"], "route graph")], text=route.summary()),
    ]
    if layers.anchors is not None:
        text = layers.anchors.summary(sentences.texts)
        if needle_ids:
            text += "\nNeedle sentence(s): " + ", ".join(
                f"{index} (salience {_float(layers.anchors.salience[index])})" for index in needle_ids)
        sections.append(Section(
            "Sentence salience",
            note="Thought-anchor salience of each sentence of the document (instruction and haystack; mean vertical "
                 "score over the receiver heads, from kept block mass); the needle sentence in orange.",
            figures=[Figure(figures["salience"], "salience per sentence")], text=text))
    if layers.heatmaps:
        sections.append(Section(
            "Block heatmaps",
            note="Kept block mass per head, pooled to at most 256 x 256 cells (max over each cell); blank cells "
                 "are pruned.",
            figures=[Figure(path, f"layer {layer}") for layer, path in sorted(layers.heatmaps.items())]))
    return sections


def _float(value: Any) -> str:
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.4g}"
