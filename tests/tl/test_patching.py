"""sparse_lens.tl.patching: TL's get_act_patch_attn_head_*_every helpers with the pattern sweep
refused before any forward, and the out/q/k/v sweeps equal to TL's own per-type helpers."""

import pytest
import torch
from transformer_lens import patching as tl_patching

import sparse_lens as sl
from sparse_lens.tl import patching
from tests.conftest import sparse_and_dense, tiny_llama_config

STREAM = sl.StreamConfig(query_block=8, key_block=8, top_k=2, keep_qk=False)
CLEAN = torch.randint(0, 90, (1, 32), generator=torch.Generator().manual_seed(0))
CORRUPTED = CLEAN.flip(-1)


def metric(logits):
    return logits[0, -1, int(CLEAN[0, -1])] - logits[0, -1].mean()


@pytest.fixture(scope="module")
def model_and_cache():
    sparse, _ = sparse_and_dense(tiny_llama_config(), STREAM)
    _, cache = sparse.run_with_cache(CLEAN)
    return sparse, cache


@pytest.mark.parametrize("helper", [patching.get_act_patch_attn_head_all_pos_every,
                                    patching.get_act_patch_attn_head_by_pos_every])
def test_the_pattern_sweep_is_refused_before_any_forward(helper, model_and_cache, monkeypatch):
    sparse, cache = model_and_cache
    forwards = []
    monkeypatch.setattr(sparse, "run_with_hooks", lambda *a, **k: forwards.append(1))
    with pytest.raises(sl.DensePatternRequiredError, match="patch_types=\\('out', 'q', 'k', 'v'\\)"):
        helper(sparse, CORRUPTED, cache, metric)  # TL's default: every sweep, the pattern's included
    assert forwards == []
    with pytest.raises(ValueError, match="patch_types"):
        helper(sparse, CORRUPTED, cache, metric, patch_types=("out", "z"))


def test_the_four_sweeps_that_apply_equal_tls_own(model_and_cache):
    sparse, cache = model_and_cache
    result = patching.get_act_patch_attn_head_all_pos_every(sparse, CORRUPTED, cache, metric,
                                                            patch_types=("out", "q", "k", "v"))
    assert result.shape == (4, 2, 4)
    for index, name in enumerate(("out", "q", "k", "v")):
        expected = getattr(tl_patching, f"get_act_patch_attn_head_{name}_all_pos")(sparse, CORRUPTED, cache, metric)
        torch.testing.assert_close(result[index, :, : expected.shape[-1]], expected)
        assert not result[index, :, expected.shape[-1]:].any()  # GQA: k and v padded with zeros, as TL does
    assert not torch.equal(result[0], result[1])  # the sweeps differ, so an order mix-up would show
