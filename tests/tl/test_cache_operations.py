"""TransformerLens' ActivationCache operations on cached BlockSparsePatterns, and the patching
helpers that write dense patterns failing early with a named error."""

import pytest
import torch
from transformer_lens import patching

import sparse_lens as sl
from tests.conftest import tiny_llama_config

STREAM = sl.StreamConfig(query_block=16, key_block=16, top_k=3)
TOKENS = torch.randint(0, 90, (2, 64), generator=torch.Generator().manual_seed(0))
PATTERN = "blocks.1.attn.hook_pattern"
ONLY_ATTENTION = lambda name: name.endswith(("hook_pattern", "hook_block_indices", "hook_block_mass"))  # noqa: E731


@pytest.fixture(scope="module")
def model():
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM)


@pytest.fixture(scope="module")
def batch_cache(model):
    with torch.no_grad():
        return model.run_with_cache(TOKENS, names_filter=ONLY_ATTENTION)[1]


def _same_row(row: sl.BlockSparsePattern, full: sl.BlockSparsePattern, index: int) -> None:
    for name in ("block_indices", "block_mass", "lse", "query", "key"):
        assert torch.equal(getattr(row, name), getattr(full, name)[index]), name


def test_run_with_cache_remove_batch_dim(model):
    with torch.no_grad():
        _, batched = model.run_with_cache(TOKENS[:1], names_filter=ONLY_ATTENTION)
        _, cache = model.run_with_cache(TOKENS[:1], names_filter=ONLY_ATTENTION, remove_batch_dim=True)
    pattern = cache[PATTERN]
    assert not pattern.has_batch_dim and pattern.shape == (4, 64, 64) and pattern.block_indices.dim() == 3
    _same_row(pattern, batched[PATTERN], 0)
    assert torch.equal(cache["blocks.1.attn.hook_block_indices"], batched[PATTERN].block_indices[0])
    # what a CircuitsVis walkthrough does next: a token-level pattern of the one prompt
    torch.testing.assert_close(pattern.token_probs(), batched[PATTERN].token_probs()[0])


def test_apply_slice_to_batch_dim(batch_cache):
    full = batch_cache[PATTERN]
    one = batch_cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim
    _same_row(one[PATTERN], full, 1)
    assert torch.equal(one["blocks.1.attn.hook_block_mass"], full.block_mass[1])
    first = batch_cache.apply_slice_to_batch_dim(slice(0, 1))[PATTERN]
    assert first.has_batch_dim and torch.equal(first.lse, full.lse[:1])
    listed = batch_cache.apply_slice_to_batch_dim([1, 0])[PATTERN]
    assert torch.equal(listed.block_indices, full.block_indices[[1, 0]])


def test_stack_activation_gives_a_layer_axis(batch_cache):
    stack = batch_cache.stack_activation("pattern")
    assert isinstance(stack, sl.BlockSparsePatternStack) and len(stack) == 2
    assert stack.block_indices.shape == (2, 2, 4, 4, 3)
    for layer in range(2):
        assert torch.equal(stack.block_indices[layer], batch_cache[f"blocks.{layer}.attn.hook_pattern"].block_indices)
    assert stack.pruned_fraction().shape == (2,)


def test_cache_to_and_cpu_move_patterns(batch_cache, model):
    with torch.no_grad():
        cache = model.run_with_cache(TOKENS, names_filter=PATTERN)[1]
    moved = cache.to("cpu")
    assert isinstance(moved[PATTERN], sl.BlockSparsePattern) and moved[PATTERN].device.type == "cpu"
    assert torch.equal(moved[PATTERN].cpu().block_indices, batch_cache[PATTERN].block_indices)
    with torch.no_grad():
        _, offloaded = model.run_with_cache(TOKENS, names_filter=PATTERN, device="cpu")
    assert torch.equal(offloaded[PATTERN].block_mass, batch_cache[PATTERN].block_mass)


def test_incl_bwd_runs_and_caches_gradients_of_tensor_hooks(model):
    _, cache = model.run_with_cache(
        TOKENS[:1], names_filter=[PATTERN, "blocks.1.attn.hook_block_mass", "blocks.1.attn.hook_z"],
        incl_bwd=True, return_type="loss",
    )
    assert isinstance(cache[PATTERN], sl.BlockSparsePattern)
    assert cache["blocks.1.attn.hook_z_grad"].abs().sum() > 0
    assert isinstance(cache["blocks.1.attn.hook_block_mass"], torch.Tensor)
    assert PATTERN + "_grad" not in cache  # a pattern has no gradient (block_attribution gives block gradients)


def _forward_counter(model):
    counts = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: counts.append(1))
    return counts


@pytest.mark.parametrize("helper", [
    patching.get_act_patch_attn_head_pattern_all_pos,
    patching.get_act_patch_attn_head_pattern_by_pos,
    patching.get_act_patch_attn_head_pattern_dest_src_pos,
])
def test_dense_pattern_patching_fails_on_its_first_run_with_a_named_error(model, helper):
    clean, corrupted = TOKENS[:1], TOKENS[1:]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    forwards = _forward_counter(model)
    try:
        with pytest.raises(sl.DensePatternRequiredError, match="hook_block_indices"):
            helper(model, corrupted, clean_cache, lambda logits: logits[0, -1, 0])
    finally:
        model.reset_hooks(including_permanent=True)
    assert len(forwards) == 1  # the first patched forward, not a whole sweep


def test_applicable_patching_helpers_still_run(model):
    clean, corrupted = TOKENS[:1, :48], TOKENS[1:, :48]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: logits[0, -1].max()  # noqa: E731
    for helper, shape in [(patching.get_act_patch_attn_head_out_all_pos, (2, 4)),
                          (patching.get_act_patch_attn_head_v_all_pos, (2, 2))]:
        result = helper(model, corrupted, clean_cache, metric)
        assert result.shape == shape and torch.isfinite(result).all()
