"""Analyses on sparse traces: fidelity against dense attention, needle recall and routes, thought
anchors, and interventions (attribution patching, block attribution, suppression, path and span
patching; import those submodules).

``sparse_lens.analysis.fidelity`` is the function (``sl.fidelity``); its module is
``sparse_lens.analysis.fidelity_metrics`` (the old module path warns and forwards for one release).
"""

from sparse_lens.analysis import fidelity as _deprecated_module_path  # noqa: F401  (loaded first: the function wins)
from sparse_lens.analysis.dense_trace import DenseTrace, collect_dense
from sparse_lens.analysis.fidelity_metrics import fidelity
from sparse_lens.analysis.needle import NeedleFidelity, NeedleProbe, NeedleRecall, needle_fidelity, needle_recall
from sparse_lens.analysis.routes import Route, RoutePath, RouteStep, needle_key_blocks, route_to_needle
from sparse_lens.analysis.task_accuracy import RulerAccuracy, RulerRecord, ruler_accuracy, ruler_samples, ruler_score
from sparse_lens.analysis.thought_anchors import (
    AnchorAgreement,
    ChainOfThought,
    Sentences,
    ThoughtAnchors,
    anchors_from_vertical_scores,
    chain_of_thought_anchors,
    compare_anchors,
    generate_chain_of_thought,
    observe_thought_anchors,
    sentence_attention_dense,
    sentence_attention_from_probs,
    sentence_attention_sparse,
    split_sentences,
    thought_anchors,
    tokenize_chain_of_thought,
    vertical_scores,
    vertical_scores_sparse,
)

__all__ = [
    "AnchorAgreement",
    "ChainOfThought",
    "DenseTrace",
    "NeedleFidelity",
    "NeedleProbe",
    "NeedleRecall",
    "Route",
    "RoutePath",
    "RouteStep",
    "RulerAccuracy",
    "RulerRecord",
    "Sentences",
    "ThoughtAnchors",
    "anchors_from_vertical_scores",
    "chain_of_thought_anchors",
    "collect_dense",
    "compare_anchors",
    "fidelity",
    "generate_chain_of_thought",
    "needle_fidelity",
    "needle_key_blocks",
    "needle_recall",
    "observe_thought_anchors",
    "route_to_needle",
    "ruler_accuracy",
    "ruler_samples",
    "ruler_score",
    "sentence_attention_dense",
    "sentence_attention_from_probs",
    "sentence_attention_sparse",
    "split_sentences",
    "thought_anchors",
    "tokenize_chain_of_thought",
    "vertical_scores",
    "vertical_scores_sparse",
]
