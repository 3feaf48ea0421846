"""OracleCache: sl.fidelity computes the exact oracle once per (layer, budget) of a trace, with the
figures of the uncached run."""

from unittest import mock

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis import fidelity_oracle
from sparse_lens.analysis.fidelity_oracle import OracleCache
from sparse_lens.errors import InvalidConfigError
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, BLOCK = 160, 16
# Two configurations share the budget (16-token blocks, top_k 4, the query blocks that see more than
# 4 key blocks); the third has its own top_k (the oracle at its cap 6) on the same query blocks,
# the fourth its own query blocks (more than min_blocks 2) at the same top_k 4.
CONFIGS = [sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=4, estimator="stream"),
           sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=4, estimator="rescored"),
           sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=6, min_blocks=4, estimator="adaptive", top_p=0.6),
           sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=4, min_blocks=2, estimator="adaptive", top_p=0.6)]


@pytest.fixture(scope="module")
def traced():
    model, _ = sparse_and_dense(tiny_llama_config(), CONFIGS[0])
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return model, tokens, sl.collect_dense(model, tokens)


def score_all(model, tokens, dense, cache):
    """Every config's report (timings left out), and the oracle_blocks calls' top_k."""
    with mock.patch.object(fidelity_oracle, "oracle_blocks", wraps=fidelity_oracle.oracle_blocks) as oracle:
        reports = [sl.fidelity(model, tokens, stream, dense=dense, per_layer=True, oracle_cache=cache)
                   for stream in CONFIGS]
    for report in reports:
        report.pop("estimate_seconds")
    return reports, [call.kwargs["top_k"] for call in oracle.call_args_list]


def test_the_oracle_runs_once_per_layer_and_budget_with_the_uncached_figures(traced):
    model, tokens, dense = traced
    cache = OracleCache(dense)
    cached, cached_calls = score_all(model, tokens, dense, cache)
    uncached, uncached_calls = score_all(model, tokens, dense, None)
    n_layers = model.cfg.n_layers
    assert sorted(cached_calls) == [4] * 2 * n_layers + [6] * n_layers  # once per (layer, budget)
    assert sorted(uncached_calls) == [4] * 3 * n_layers + [6] * n_layers  # once per (layer, config)
    assert cache.calls == len(cache) == 3 * n_layers
    assert cached == uncached  # every figure, per layer too, bit for bit
    oracles = [report["oracle_recall_mean"] for report in cached]
    assert oracles[0] == oracles[1] and len({oracles[1], oracles[2], oracles[3]}) == 3


def test_a_cache_scores_only_its_own_trace(traced):
    model, tokens, dense = traced
    cache = OracleCache(dense)
    other = sl.collect_dense(model, tokens)
    with pytest.raises(InvalidConfigError, match="another dense trace"):
        sl.fidelity(model, tokens, CONFIGS[0], dense=other, oracle_cache=cache)
    with pytest.raises(InvalidConfigError, match="another dense trace"):
        sl.fidelity(model, tokens, CONFIGS[0], oracle_cache=cache)
