"""The dense reference sentence attention equals the paper's definition, token by token."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sparse_lens.analysis.anchors.dense import sentence_attention_dense, sentence_attention_from_probs
from tests.analysis.anchors.reference import ALIGNED, BLOCK, SEQ, UNALIGNED, brute_sentence_matrix


@pytest.mark.parametrize("spans", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
def test_dense_sentence_attention_is_the_brute_force_definition(tiny_traces, spans):
    traces, probs = tiny_traces
    for top_k in (SEQ // BLOCK, 6):  # the dense reference ignores what the estimate kept
        for layer, pattern in enumerate(traces[top_k]):
            brute = brute_sentence_matrix(probs[layer].numpy(), spans)
            np.testing.assert_allclose(sentence_attention_from_probs(probs[layer], spans).numpy(), brute,
                                       rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(sentence_attention_dense(pattern, spans, query_chunk=48).numpy(), brute,
                                       rtol=1e-5, atol=1e-8)


def test_dense_sentence_attention_needs_an_observe_pattern_with_qk(tiny_traces):
    traces, _ = tiny_traces
    pattern = traces[6][0]
    with pytest.raises(ValueError, match="observe"):
        sentence_attention_dense(replace(pattern, mode="sparse"), ALIGNED)
    with pytest.raises(ValueError, match="keep_qk"):
        sentence_attention_dense(replace(pattern, query=None, key=None), ALIGNED)
