"""Analyses on sparse traces: fidelity against dense attention, needle recall and routes, thought
anchors, and interventions (attribution, suppression, path patching; import those submodules)."""

from sparse_lens.analysis.fidelity import DenseTrace, collect_dense, fidelity
from sparse_lens.analysis.routes import Route, RoutePath, RouteStep, needle_key_blocks, route_to_needle
from sparse_lens.analysis.thought_anchors import (
    AnchorAgreement,
    Sentences,
    ThoughtAnchors,
    anchors_from_vertical_scores,
    compare_anchors,
    observe_thought_anchors,
    sentence_attention_dense,
    sentence_attention_from_probs,
    sentence_attention_sparse,
    split_sentences,
    thought_anchors,
    vertical_scores,
    vertical_scores_sparse,
)

__all__ = [
    "AnchorAgreement",
    "DenseTrace",
    "Route",
    "RoutePath",
    "RouteStep",
    "Sentences",
    "ThoughtAnchors",
    "anchors_from_vertical_scores",
    "collect_dense",
    "compare_anchors",
    "fidelity",
    "needle_key_blocks",
    "observe_thought_anchors",
    "route_to_needle",
    "sentence_attention_dense",
    "sentence_attention_from_probs",
    "sentence_attention_sparse",
    "split_sentences",
    "thought_anchors",
    "vertical_scores",
    "vertical_scores_sparse",
]
