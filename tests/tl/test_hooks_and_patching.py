"""TransformerLens workflows on the sparse model: hooks that edit the pattern, caching options, patching."""

import pytest
import torch
from transformer_lens import patching

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_llama_config

STREAM = sl.StreamConfig(query_block=16, key_block=16, top_k=4)
TOKENS = torch.randint(0, 90, (1, 128), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models():
    return sparse_and_dense(tiny_llama_config(), STREAM)


def test_returning_an_edited_pattern_recomputes_attention(models):
    sparse, _ = models
    with torch.no_grad():
        baseline = sparse(TOKENS)

        def drop_sink_block(pattern, hook):
            indices = pattern.block_indices.clone()
            indices[indices == 0] = -1  # knock out key block 0 for every query block that keeps it...
            indices[:, :, 0, 0] = 0  # ...except query block 0, which has nothing else to attend to
            return pattern.with_block_indices(indices)

        knocked_out = sparse.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_pattern", drop_sink_block)])
        identity = sparse.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda pattern, hook: pattern)])
        unit_gate = sparse.run_with_hooks(TOKENS, fwd_hooks=[(
            "blocks.0.attn.hook_pattern", lambda p, hook: p.with_gate(torch.ones_like(p.block_mass)))])
    assert torch.equal(identity, baseline)
    torch.testing.assert_close(unit_gate, baseline)
    assert (knocked_out - baseline).abs().max() > 1e-4
    # Knocking out only affects positions after the first query block.
    torch.testing.assert_close(knocked_out[:, :16], baseline[:, :16])


def test_editing_a_pattern_in_observe_mode_is_an_error(models):
    sparse, _ = models
    with sparse.stream_settings(mode="observe"), pytest.raises(sl.SparseLensError, match="observe"):
        sparse.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p.with_gate(p.block_mass))])


def test_pos_slice_keeps_the_query_blocks_of_the_positions(models):
    sparse, _ = models
    _, cache = sparse.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_pattern", pos_slice=-1)
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.n_query_blocks == 1 and pattern.first_query_block == 7
    _, full = sparse.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_pattern")
    assert torch.equal(pattern.block_indices, full["blocks.1.attn.hook_pattern"].block_indices[:, :, -1:])


def test_hook_attn_scores_never_fires(models):
    sparse, _ = models
    fired = []
    sparse.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_attn_scores", lambda x, hook: fired.append(x))])
    assert fired == []


def test_tl_head_output_patching_matches_dense_when_nothing_is_pruned():
    sparse, dense = sparse_and_dense(tiny_llama_config(), STREAM.replace(top_k=64))
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 90, (1, 96), generator=generator)
    corrupted = clean.clone()
    corrupted[0, 10:20] = torch.randint(0, 90, (10,), generator=generator)
    answer = int(clean[0, -1])
    metric = lambda logits: logits[0, -1, answer] - logits[0, -1].mean()  # noqa: E731
    results = []
    for model in (sparse, dense):
        _, clean_cache = model.run_with_cache(clean)
        results.append(patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric))
    assert results[0].shape == (2, 4)
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_tl_residual_patching_runs_on_a_pruned_model(models):
    sparse, _ = models
    clean = TOKENS[:, :80]
    _, clean_cache = sparse.run_with_cache(clean)
    metric = lambda logits: logits[0, -1].max()  # noqa: E731
    result = patching.get_act_patch_resid_pre(sparse, clean.flip(-1), clean_cache, metric)
    assert result.shape == (2, 80) and torch.isfinite(result).all()
