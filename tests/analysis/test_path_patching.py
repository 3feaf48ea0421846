"""Path patching against a brute-force oracle on a 3-layer model, where freezing the non-sender
heads matters (weights at 10x the default init; senders in layer 0, receivers in layer 2: without freezing, layer 1 relays the
senders' change to the receivers)."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.path_patching import path_patch, path_patch_cached
from sparse_lens.errors import InvalidPathError, InvalidPositionsError, LogitsNotKeptError, ShapeError
from tests.conftest import sparse_and_dense, tiny_llama_config

GENERATOR = torch.Generator().manual_seed(3)
CLEAN = torch.randint(0, 90, (1, 64), generator=GENERATOR)
CORRUPTED = torch.cat([torch.randint(0, 90, (1, 32), generator=GENERATOR), CLEAN[:, 32:]], dim=1)
SENDERS = [(0, 1), (0, 3)]
RECEIVERS = {"q": [(2, 0), (2, 3)], "k": [(2, 1)], "v": [(1, 0), (2, 1)]}  # k/v: kv heads (2 of them)
STREAM = dict(query_block=16, key_block=16)
# Larger weights than the default init (0.02), so that layers interact strongly and every bug shows.
CONFIG = dict(num_hidden_layers=3, initializer_range=0.2)


def metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 9]


@pytest.fixture(scope="module")
def pruned():
    model, _ = sparse_and_dense(tiny_llama_config(**CONFIG), sl.StreamConfig(**STREAM, top_k=2))
    return model


@pytest.fixture(scope="module")
def unpruned():
    return sparse_and_dense(tiny_llama_config(**CONFIG), sl.StreamConfig(**STREAM, top_k=64))


def brute_force(model, senders, receivers, receiver_input, *, freeze=True, every_receiver_head=False):
    """Path patching written out from its definition: cache every head's output of both runs, build
    each layer's head outputs head by head, record the receivers' inputs, patch them into the
    clean run. ``freeze=False`` / ``every_receiver_head=True`` are the two classic bugs."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(CLEAN, names_filter=lambda name: name in z_names)
        _, corrupted = model.run_with_cache(CORRUPTED, names_filter=lambda name: name in z_names)

        def head_outputs(z, hook):
            layer = hook.layer()
            heads = []
            for head in range(n_heads):
                if (layer, head) in senders:
                    heads.append(corrupted[z_names[layer]][:, :, head])
                else:
                    heads.append(clean[z_names[layer]][:, :, head] if freeze else z[:, :, head])
            return torch.stack(heads, dim=2)

        recorded = {}

        def record(value, hook):
            recorded[hook.layer()] = value.clone()
            return value

        receiver_layers = sorted({layer for layer, _ in receivers})
        names = [f"blocks.{layer}.attn.hook_{receiver_input}" for layer in receiver_layers]
        model.run_with_hooks(CLEAN, fwd_hooks=[(name, head_outputs) for name in z_names] + [(name, record) for name in names])

        def patch(value, hook):
            value = value.clone()
            for layer, head in receivers:
                if layer == hook.layer():
                    if every_receiver_head:
                        value[:] = recorded[layer]
                    else:
                        value[:, :, head] = recorded[layer][:, :, head]
            return value

        return float(metric(model.run_with_hooks(CLEAN, fwd_hooks=[(name, patch) for name in names])))


@pytest.mark.parametrize("receiver_input", ["q", "k", "v"])
def test_lean_and_cached_equal_the_brute_force_oracle_on_a_pruned_three_layer_model(pruned, receiver_input):
    receivers = RECEIVERS[receiver_input]
    expected = brute_force(pruned, SENDERS, receivers, receiver_input)
    # The configuration is one where both classic bugs change the value, so the checks below can fail.
    assert abs(brute_force(pruned, SENDERS, receivers, receiver_input, freeze=False) - expected) > 1e-2
    assert abs(brute_force(pruned, SENDERS, receivers, receiver_input, every_receiver_head=True) - expected) > 1e-2
    lean = path_patch(pruned, CLEAN, CORRUPTED, SENDERS, receivers, metric, receiver_input)
    cached = path_patch_cached(pruned, CLEAN, CORRUPTED, SENDERS, receivers, metric, receiver_input)
    assert lean == pytest.approx(expected, abs=1e-4)
    assert cached == pytest.approx(expected, abs=1e-4)
    assert lean == pytest.approx(cached, abs=1e-5)


def test_equals_the_dense_bridge_when_nothing_is_pruned(unpruned):
    sparse, dense = unpruned
    expected = brute_force(dense, SENDERS, RECEIVERS["q"], "q")
    assert path_patch(sparse, CLEAN, CORRUPTED, SENDERS, RECEIVERS["q"], metric) == pytest.approx(expected, abs=1e-4)
    assert path_patch(dense, CLEAN, CORRUPTED, SENDERS, RECEIVERS["q"], metric) == pytest.approx(expected, abs=1e-4)


def test_no_senders_is_the_clean_run_and_positions_keep_only_what_the_metric_reads(pruned):
    with torch.no_grad():
        clean_logits = pruned(CLEAN)
    assert path_patch(pruned, CLEAN, CORRUPTED, [], RECEIVERS["q"], metric) == pytest.approx(float(metric(clean_logits)), abs=1e-5)
    full = path_patch(pruned, CLEAN, CORRUPTED, SENDERS, RECEIVERS["q"], metric)
    seen = []

    def last_position_metric(logits):
        seen.append(logits.shape)
        return logits[0, 0, 5] - logits[0, 0, 9]

    assert path_patch(pruned, CLEAN, CORRUPTED, SENDERS, RECEIVERS["q"], last_position_metric, positions=[-1]) == \
        pytest.approx(full, abs=1e-5)
    assert seen == [torch.Size([1, 1, 101])]


def test_positions_before_the_corruption_are_unchanged(pruned):
    """Corrupting only the last query block leaves every earlier prediction as in the clean run."""
    corrupted = CLEAN.clone()
    corrupted[:, 48:] = (corrupted[:, 48:] + 7) % 90
    kept = {}

    def record(logits):
        kept["logits"] = logits
        return logits[0, -1, 5]

    path_patch(pruned, CLEAN, corrupted, SENDERS, RECEIVERS["q"], record)
    with torch.no_grad():
        clean_logits = pruned(CLEAN)
    torch.testing.assert_close(kept["logits"][:, :48], clean_logits[:, :48], atol=1e-5, rtol=0)
    assert (kept["logits"][:, 48:] - clean_logits[:, 48:]).abs().max() > 1e-2


@pytest.mark.parametrize("call, message", [
    (dict(senders=[(2, 0)], receivers=[(2, 1)]), "at or after"),
    (dict(senders=[(1, 0)], receivers=[(1, 1), (2, 1)]), "at or after"),
    (dict(senders=[(0, 4)], receivers=[(2, 1)]), "does not exist"),
    (dict(senders=[(3, 0)], receivers=[(2, 1)]), "does not exist"),
    (dict(senders=[(0, 0)], receivers=[]), "receivers is empty"),
    (dict(senders=[(0, 0)], receivers=[(2, 3)], receiver_input="k"), "key-value heads"),
    (dict(senders=[(0, 0)], receivers=[(2, 1)], receiver_input="z"), "receiver_input"),
])
@pytest.mark.parametrize("tool", [path_patch, path_patch_cached])
def test_bad_requests_raise_named_errors(pruned, tool, call, message):
    with pytest.raises(InvalidPathError, match=message):
        tool(pruned, CLEAN, CORRUPTED, metric=metric, **call)


def test_bad_tokens_and_positions_raise_named_errors(pruned):
    with pytest.raises(ShapeError):
        path_patch(pruned, CLEAN, CORRUPTED[:, :32], SENDERS, RECEIVERS["q"], metric)
    with pytest.raises(InvalidPositionsError):
        path_patch(pruned, CLEAN, CORRUPTED, SENDERS, RECEIVERS["q"], metric, positions=[64])


@pytest.mark.parametrize("tool", [path_patch, path_patch_cached])
def test_a_metric_reading_an_unkept_position_raises_a_named_error(pruned, tool):
    with pytest.raises(LogitsNotKeptError):
        tool(pruned, CLEAN, CORRUPTED, SENDERS, RECEIVERS["q"], lambda lg: lg[0, 30, 5], positions=[-1])


def test_a_batch_of_two_prompts_is_patched_row_by_row(pruned):
    """Rows of a batch are independent path patchings: the batch's summed metric is the sum of each
    row run alone (a mix-up of step 2's clean and patched rows, e.g. interleaving them, shows only
    with batch > 1)."""
    clean = torch.cat([CLEAN, (CLEAN + 11) % 90])
    corrupted = torch.cat([CORRUPTED, torch.cat([torch.randint(0, 90, (1, 32), generator=torch.Generator().manual_seed(4)),
                                                 clean[1:, 32:]], dim=1)])

    def summed(logits):
        return (logits[:, -1, 5] - logits[:, -1, 9]).sum()

    for receiver_input in ("q", "v"):
        receivers = RECEIVERS[receiver_input]
        rows = [path_patch(pruned, clean[i:i + 1], corrupted[i:i + 1], SENDERS, receivers, summed, receiver_input)
                for i in range(2)]
        batched = path_patch(pruned, clean, corrupted, SENDERS, receivers, summed, receiver_input)
        assert batched == pytest.approx(sum(rows), abs=1e-4)
        assert path_patch_cached(pruned, clean, corrupted, SENDERS, receivers, summed, receiver_input) == \
            pytest.approx(batched, abs=1e-4)
