import torch

import sparse_lens as sl
from sparse_lens.analysis.path_patching import path_patch
from tests.conftest import sparse_and_dense, tiny_llama_config

GENERATOR = torch.Generator().manual_seed(3)
CLEAN = torch.randint(0, 90, (1, 80), generator=GENERATOR)
CORRUPTED = torch.cat([torch.randint(0, 90, (1, 40), generator=GENERATOR), CLEAN[:, 40:]], dim=1)


def metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 9]


def test_path_patching_matches_dense_when_nothing_is_pruned_and_is_neutral_without_senders():
    sparse, dense = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    results = [path_patch(model, CLEAN, CORRUPTED, senders=[(0, 1), (0, 3)], receivers=[(1, 0), (1, 2)], metric=metric)
               for model in (sparse, dense)]
    assert abs(results[0] - results[1]) < 1e-4
    with torch.no_grad():
        clean_metric = float(metric(sparse(CLEAN)))
    assert abs(path_patch(sparse, CLEAN, CORRUPTED, senders=[], receivers=[(1, 0)], metric=metric) - clean_metric) < 1e-5
    assert abs(results[0] - clean_metric) > 1e-6  # the path does carry something


def test_path_patching_runs_on_a_pruned_model_through_keys():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    value = path_patch(sparse, CLEAN, CORRUPTED, senders=[(0, 0)], receivers=[(1, 1)], metric=metric, receiver_input="k")
    assert torch.isfinite(torch.tensor(value))
