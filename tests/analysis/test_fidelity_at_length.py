"""sl.fidelity's long-context options: layers scored inside the observe forward (no DenseTrace),
next-token figures at chosen positions only, and the oracle on a sample of query blocks."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels import dense_block_mass
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, BLOCK, TOP_K = 160, 16, 4


@pytest.fixture(scope="module")
def setup():
    stream = sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=TOP_K, estimator="stream")
    sparse, _ = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return sparse, tokens, sl.collect_dense(sparse, tokens)


def test_scoring_inside_the_forward_equals_scoring_a_dense_trace(setup):
    sparse, tokens, dense = setup
    streamed = sl.fidelity(sparse, tokens, per_layer=True)
    stored = sl.fidelity(sparse, tokens, dense=dense, per_layer=True)
    for name in ("pruned_fraction", "mass_recall_mean", "mass_recall_p5", "oracle_recall_mean", "oracle_ratio",
                 "next_token_kl", "top1_agreement", "final_kl"):
        assert streamed[name] == pytest.approx(stored[name], abs=1e-5), name
    assert [row["layer"] for row in streamed["layers"]] == [0, 1]


def test_next_token_figures_at_chosen_positions(setup):
    sparse, tokens, dense = setup
    positions = torch.tensor([10, 70, 100, SEQ - 1])  # 10 is before the first pruned position (64)
    report = sl.fidelity(sparse, tokens, positions=positions)
    with torch.no_grad(), sparse.stream_settings(keep_qk=False):
        sparse_logits = sparse(tokens)
    dense_logp = dense.logits[0, positions[1:]].log_softmax(-1)
    sparse_logp = sparse_logits[0, positions[1:]].float().log_softmax(-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)
    assert report["positions_scored"] == 3
    assert report["next_token_kl"] == pytest.approx(float(kl.mean()), abs=1e-5)
    assert report["final_kl"] == pytest.approx(float(kl[-1]), abs=1e-5)
    for outside in ([5, SEQ], [-SEQ - 1, 5]):  # the patching tools' error, for the same positions
        with pytest.raises(sl.InvalidPositionsError, match="outside"):
            sl.fidelity(sparse, tokens, positions=torch.tensor(outside))
    for bad in ([70, 10], [10, 70, 70], [-1, 10]):  # fidelity's own rule: ascending, once counted from the start
        with pytest.raises(sl.InvalidPositionsError):
            sl.fidelity(sparse, tokens, positions=bad)


def test_negative_positions_count_from_the_end_as_in_the_patching_tools(setup):
    sparse, tokens, dense = setup
    from_the_end = sl.fidelity(sparse, tokens, dense=dense, positions=[10, -60, -1])
    from_the_start = sl.fidelity(sparse, tokens, dense=dense, positions=torch.tensor([10, SEQ - 60, SEQ - 1]))
    timing = ("estimate_seconds",)  # wall time: the one figure two runs need not share
    assert {k: v for k, v in from_the_end.items() if k not in timing} == \
        {k: v for k, v in from_the_start.items() if k not in timing}
    assert from_the_end["positions_scored"] == 2  # 10 is before the first pruned position


def test_oracle_on_every_nth_pruned_query_block(setup):
    sparse, tokens, dense = setup
    report = sl.fidelity(sparse, tokens, dense=dense, oracle_stride=3)
    rows = torch.arange(TOP_K, SEQ // BLOCK)[::3]  # pruned rows: those seeing more than top_k blocks
    oracles = []
    for layer in range(2):
        mass = dense_block_mass(dense.query[layer], dense.key[layer], dense.lse[layer], query_block=BLOCK,
                                key_block=BLOCK, scale=dense.scale)
        oracles.append(mass[:, :, rows].topk(TOP_K, dim=-1).values.sum(-1).flatten())
    full = sl.fidelity(sparse, tokens, dense=dense, per_layer=True)
    assert report["oracle_recall_mean"] == pytest.approx(float(torch.cat(oracles).mean()), abs=1e-5)
    assert report["mass_recall_mean"] == pytest.approx(full["mass_recall_mean"], abs=1e-6)  # recall: every row
    assert report["oracle_recall_mean"] != pytest.approx(full["oracle_recall_mean"], abs=1e-4)
