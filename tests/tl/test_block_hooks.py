"""hook_block_indices and hook_block_mass: plain tensor hooks beside hook_pattern (order, caching,
names_filter, TL patch setters, edits equal to the pattern edits, observe mode)."""

import pytest
import torch
from transformer_lens.patching import layer_head_pattern_patch_setter

import sparse_lens as sl
from tests.conftest import tiny_llama_config

STREAM = sl.StreamConfig(query_block=16, key_block=16, top_k=3)
TOKENS = torch.randint(0, 90, (1, 80), generator=torch.Generator().manual_seed(0))
INDICES, MASS, PATTERN = (f"blocks.0.attn.hook_{name}" for name in ("block_indices", "block_mass", "pattern"))


@pytest.fixture(scope="module")
def model():
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM)


def _run(model, hooks, tokens=TOKENS):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)


def _without_sink(indices):
    """Knock out key block 0 in every row that has another block (row 0 keeps it)."""
    edited = indices.clone()
    edited[..., 1:, :][edited[..., 1:, :] == 0] = -1
    return edited


@pytest.mark.parametrize("mode", ["sparse", "observe"])
def test_hooks_fire_in_order_with_plain_tensors(model, mode):
    fired = []
    record = lambda x, hook: fired.append((hook.name.rsplit(".", 1)[-1], x))  # noqa: E731
    with model.stream_settings(mode=mode):
        _run(model, [(INDICES, record), (MASS, record), (PATTERN, record)])
    assert [name for name, _ in fired] == ["hook_block_indices", "hook_block_mass", "hook_pattern"]
    (_, indices), (_, mass), (_, pattern) = fired
    assert isinstance(indices, torch.Tensor) and indices.dtype == torch.int64 and indices.shape == (1, 4, 5, 3)
    assert torch.equal(indices, pattern.block_indices) and torch.equal(mass, pattern.block_mass)


def test_dense_mode_fires_no_block_hooks(model):
    fired = []
    with model.stream_settings(mode="dense"):
        _run(model, [(INDICES, lambda x, hook: fired.append(x)), (MASS, lambda x, hook: fired.append(x))])
    assert fired == []


def test_names_filter_caches_only_the_block_tensors(model):
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_block_indices"))
        _, full = model.run_with_cache(TOKENS, names_filter=PATTERN)
    assert sorted(cache.keys()) == ["blocks.0.attn.hook_block_indices", "blocks.1.attn.hook_block_indices"]
    assert torch.equal(cache[INDICES], full[PATTERN].block_indices)


def test_returned_or_in_place_index_edits_equal_the_pattern_edit(model):
    baseline = _run(model, [])
    via_pattern = _run(model, [(PATTERN, lambda p, hook: p.with_block_indices(_without_sink(p.block_indices)))])
    returned = _run(model, [(INDICES, lambda x, hook: _without_sink(x))])

    def in_place(x, hook):
        x.copy_(_without_sink(x))
        return x

    edited_in_place = _run(model, [(INDICES, in_place)])
    assert (via_pattern - baseline).abs().max() > 1e-4
    torch.testing.assert_close(returned, via_pattern)
    torch.testing.assert_close(edited_in_place, via_pattern)


def test_an_index_edit_is_what_the_pattern_hook_sees(model):
    seen = []
    _run(model, [(INDICES, lambda x, hook: _without_sink(x)), (PATTERN, lambda p, hook: seen.append(p))])
    assert not (seen[0].block_indices[..., 1:, :] == 0).any()


def test_tl_patch_setters_work_on_block_indices(model):
    """TL's head-level setter, written for [batch, head, ...] patterns, patches the selection."""
    corrupted = TOKENS.flip(-1)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(TOKENS, names_filter=INDICES)
    clean = clean_cache[INDICES]
    patched = _run(model, [(INDICES, lambda x, hook: layer_head_pattern_patch_setter(x, [0, 2], clean))], corrupted)

    def by_pattern(p, hook):
        indices = p.block_indices.clone()
        indices[:, 2] = clean[:, 2]
        return p.with_block_indices(indices)

    torch.testing.assert_close(patched, _run(model, [(PATTERN, by_pattern)], corrupted))
    assert (patched - _run(model, [], corrupted)).abs().max() > 1e-5


def test_a_mass_edit_acts_as_a_gate(model):
    def halve_local(x, hook):
        edited = x.clone()
        edited[..., 1:, -1] *= 0.5
        return edited

    def gate_local(p, hook):
        gate = torch.ones_like(p.block_mass)
        gate[..., 1:, -1] = 0.5
        return p.with_gate(gate)

    via_mass = _run(model, [(MASS, halve_local)])
    torch.testing.assert_close(via_mass, _run(model, [(PATTERN, gate_local)]))
    assert (via_mass - _run(model, [])).abs().max() > 1e-4
    seen = []
    _run(model, [(MASS, halve_local), (PATTERN, lambda p, hook: seen.append(p))])
    used = seen[0].block_indices[..., 1:, -1] >= 0  # unused slots have mass 0: their gate stays 1
    torch.testing.assert_close(seen[0].block_gate[..., 1:, -1], torch.where(used, 0.5, 1.0))


def test_a_mass_edit_cannot_give_mass_to_an_unused_slot(model):
    def fill(x, hook):
        return x + 0.1

    with pytest.raises(sl.InvalidPatternError, match="was 0"):
        _run(model, [(MASS, fill)])


def test_hooks_that_edit_nothing_change_nothing(model):
    baseline = _run(model, [])
    same = _run(model, [(INDICES, lambda x, hook: x.clone()), (MASS, lambda x, hook: x),
                        (PATTERN, lambda p, hook: p.clone())])
    assert torch.equal(same, baseline)


@pytest.mark.parametrize("name", [INDICES, MASS])
def test_edits_in_observe_mode_are_refused(model, name):
    edit = (lambda x, hook: _without_sink(x)) if name == INDICES else (lambda x, hook: x * 0.5)
    with model.stream_settings(mode="observe"), pytest.raises(sl.ObserveModeEditError, match="observe"):
        _run(model, [(name, edit)])


def test_an_in_place_pattern_edit_counts(model):
    """A hook that changes the pattern's tensors in place and returns it (TL's patching style) is an edit."""
    def in_place(p, hook):
        p.block_indices.copy_(_without_sink(p.block_indices))
        return p

    expected = _run(model, [(PATTERN, lambda p, hook: p.with_block_indices(_without_sink(p.block_indices)))])
    torch.testing.assert_close(_run(model, [(PATTERN, in_place)]), expected)
