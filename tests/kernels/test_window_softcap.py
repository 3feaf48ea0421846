"""Sliding windows, logit soft-capping and attention sinks in every attention kernel.

The oracle is a plain dense softmax written here, token by token: scores ``scale * q.k``, capped
``softcap * tanh(s / softcap)``, masked causally and to the window (``i - window < j <= i``), with
one sink column per head in the normaliser whose probability is dropped. The torch references
and the Triton kernels (CPU interpreter here) are each checked against it, and against each
other, forward and backward, on random inputs: a dropped mask, cap or sink fails them.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparse_lens.errors import InvalidConfigError, ShapeError
from sparse_lens.kernels import dispatch
from sparse_lens.kernels.dense import block_mass_rows, dense_attention
from sparse_lens.kernels.oracle import oracle_blocks
from sparse_lens.kernels.sparse_attention import block_sparse_attention, kept_block_mass
from sparse_lens.kernels.window import max_window_blocks, window_band, window_blocks, window_fits

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
SEQ, BLOCK, SCALE = 75, 16, 0.5  # a partial last block
WINDOW, SOFTCAP = 18, 1.5  # the window cuts inside blocks, and the first query of a 16-row tile sees
# exactly the last key of an older 16-key tile (the edge of the kernels' tile skipping); the cap binds
FEATURES = {
    "window": dict(window=WINDOW),
    "softcap": dict(softcap=SOFTCAP),
    "sinks": dict(sinks=True),
    "all": dict(window=WINDOW, softcap=SOFTCAP, sinks=True),
}


def draw(seed: int, heads=4, kv_heads=2, seq=SEQ, d=16):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(1, h, seq, d, generator=generator).to(DEVICE) for h in (heads, kv_heads, kv_heads))
    sinks = (torch.randn(heads, generator=generator) * 2).to(DEVICE)
    return query * 2, key, value, sinks


def settings(name: str, sinks: torch.Tensor) -> dict:
    features = dict(FEATURES[name])
    if features.pop("sinks", False):
        features["sinks"] = sinks
    return features


def dense_softmax(query, key, value, *, scale, window=None, softcap=None, sinks=None):
    """The plain oracle: ``(output, lse, probs [batch, head, T, T])``."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(query.shape[2], device=query.device)
    visible = positions[None, :] <= positions[:, None]
    if window is not None:
        visible &= positions[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink_column = sinks[None, :, None, None].expand(*scores.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return probs @ value, lse, probs


def block_sums(probs, block=BLOCK):
    """Token probabilities summed per (query block, key block), averaged over the block's queries."""
    seq = probs.shape[-1]
    padded = torch.nn.functional.pad(probs, (0, -seq % block, 0, -seq % block))
    sums = padded.unflatten(-1, (-1, block)).sum(-1).unflatten(-2, (-1, block)).sum(-2)
    n_real = torch.clamp(seq - torch.arange(sums.shape[-2], device=probs.device) * block, max=block)
    return sums / n_real[:, None]


def band_indices(query, window):
    band = window_band(query.shape[2], BLOCK, BLOCK, window, device=query.device)
    return band.expand(*query.shape[:2], *band.shape)


def sorted_slots(indices):
    """Rows ascending with the unused slots (-1) last, as the pattern contract wants."""
    return torch.where(indices >= 0, indices, 10**6).sort(-1).values.masked_fill(
        torch.where(indices >= 0, indices, 10**6).sort(-1).values == 10**6, -1)


# ----- window geometry -----------------------------------------------------------------------
@pytest.mark.parametrize("query_block,key_block", [(16, 16), (32, 16), (16, 32), (8, 8)])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 17, 40])
def test_window_band_is_every_block_with_a_visible_key(query_block, key_block, window):
    seq = 90
    positions = torch.arange(seq)
    visible = positions[None, :] <= positions[:, None]
    if window is not None:
        visible &= positions[None, :] > positions[:, None] - window
    band = window_band(seq, query_block, key_block, window)
    for row in range(band.shape[0]):
        rows = visible[row * query_block : (row + 1) * query_block]
        expected = [b for b in range(-(-seq // key_block)) if rows[:, b * key_block : (b + 1) * key_block].any()]
        kept = band[row].tolist()
        assert kept == expected + [-1] * (len(kept) - len(expected)), (row, kept, expected)
        assert list(window_blocks(row, seq_len=seq, query_block=query_block, key_block=key_block, window=window)) == expected
    assert (band[:, -1] >= 0).any(), "the band is no wider than its widest row"
    if window is not None:  # the widest row of a long sequence is the bound window_fits uses
        long_band = window_band(50 * max(query_block, key_block) + window, query_block, key_block, window)
        width = int((long_band >= 0).sum(-1).max())
        assert width == max_window_blocks(window, query_block, key_block)
        assert window_fits(window, key_block, width, query_block=query_block)
        assert not window_fits(window, key_block, width - 1, query_block=query_block)


def test_window_fits_global_layer_and_bad_windows():
    assert not window_fits(None, 16, 10**6)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InvalidConfigError):
            window_band(64, 16, 16, bad)


# ----- torch references against the plain oracle ----------------------------------------------
@pytest.mark.parametrize("name", FEATURES)
def test_reference_attention_over_the_band_equals_dense_softmax(name):
    query, key, value, sinks = draw(1)
    features = settings(name, sinks)
    expected_out, expected_lse, probs = dense_softmax(query, key, value, scale=SCALE, **features)
    indices = band_indices(query, features.get("window"))
    output, lse, mass = block_sparse_attention(
        query, key, value, indices, query_block=BLOCK, key_block=BLOCK, scale=SCALE, **features
    )
    torch.testing.assert_close(output, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    expected_mass = block_sums(probs).gather(-1, indices.clamp(min=0)) * (indices >= 0)
    torch.testing.assert_close(mass, expected_mass, atol=1e-5, rtol=1e-5)
    dense_out, dense_lse = dense_attention(query, key, value, scale=SCALE, query_chunk=7, **features)
    torch.testing.assert_close(dense_out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_reference_sparse_selection_renormalises_with_the_sink():
    """Kept blocks only (the diagonal plus one random earlier block): the oracle masked to them."""
    query, key, value, sinks = (t.cpu() for t in draw(2))  # the torch reference, on the CPU like its oracle
    features = dict(window=40, softcap=SOFTCAP, sinks=sinks)
    band = band_indices(query, 40)
    keep_first = torch.rand(band.shape[:-1], generator=torch.Generator().manual_seed(0)) < 0.5
    indices = torch.where((band == band.amax(-1, keepdim=True)) | keep_first[..., None], band, -1)
    indices = sorted_slots(indices)
    kept_tokens = torch.zeros(*indices.shape[:2], SEQ, SEQ, dtype=torch.bool)
    for row in range(indices.shape[2]):
        for block in indices[0, :, row].unique().tolist():
            if block >= 0:
                heads = (indices[0, :, row] == block).any(-1)
                kept_tokens[0, heads, row * BLOCK : (row + 1) * BLOCK, block * BLOCK : (block + 1) * BLOCK] = True
    group = 2
    keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = SOFTCAP * torch.tanh(torch.einsum("bhqd,bhkd->bhqk", query, keys) * SCALE / SOFTCAP)
    positions = torch.arange(SEQ)
    visible = (positions[None] <= positions[:, None]) & (positions[None] > positions[:, None] - 40) & kept_tokens
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(torch.cat([scores, sinks[None, :, None, None].expand(1, 4, SEQ, 1)], -1), -1)
    output, sparse_lse, mass = block_sparse_attention(
        query, key, value, indices, query_block=BLOCK, key_block=BLOCK, scale=SCALE, **features
    )
    torch.testing.assert_close(sparse_lse, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, torch.exp(scores - lse[..., None]) @ values, atol=1e-5, rtol=1e-5)
    # Each row's kept mass is 1 minus the mean sink probability of its queries.
    sink_probs = torch.nn.functional.pad(torch.exp(sinks[None, :, None] - lse), (0, -SEQ % BLOCK))
    sink_mean = sink_probs.unflatten(-1, (-1, BLOCK)).sum(-1) / torch.clamp(SEQ - torch.arange(5) * BLOCK, max=BLOCK)
    torch.testing.assert_close(mass.sum(-1), 1 - sink_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "softcap", "all"])
def test_reference_block_masses_under_the_exact_lse(name):
    query, key, value, sinks = draw(3)
    features = settings(name, sinks)
    _, lse, probs = dense_softmax(query, key, value, scale=SCALE, **features)
    mass_features = {k: v for k, v in features.items() if k != "sinks"}
    expected = block_sums(probs)
    rows = block_mass_rows(query, key, lse, torch.arange(5), query_block=BLOCK, key_block=BLOCK, scale=SCALE,
                           **mass_features)
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)
    indices = band_indices(query, features.get("window"))
    kept = kept_block_mass(query, key, indices, lse, query_block=BLOCK, key_block=BLOCK, scale=SCALE, **mass_features)
    torch.testing.assert_close(kept, expected.gather(-1, indices.clamp(min=0)) * (indices >= 0), atol=1e-5, rtol=1e-5)


def test_reference_gradients_equal_dense_softmax_gradients():
    query, key, value, sinks = draw(4)
    tensors = [t.clone().requires_grad_() for t in (query, key, value, sinks)]
    weights = torch.randn(1, 4, SEQ, 16, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    features = lambda t: dict(window=WINDOW, softcap=SOFTCAP, sinks=t[3])  # noqa: E731
    dense = dense_softmax(*tensors[:3], scale=SCALE, **features(tensors))[0]
    expected = torch.autograd.grad((dense * weights).sum(), tensors)
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    sparse = block_sparse_attention(*tensors[:3], band_indices(query, WINDOW), query_block=BLOCK, key_block=BLOCK,
                                    scale=SCALE, **features(tensors))[0]
    for name, got, want in zip("qkv", torch.autograd.grad((sparse * weights).sum(), tensors), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"d {name}")
    assert expected[3].abs().min() > 0, "every sink receives a gradient"


# ----- Triton kernels against the references and the oracle -----------------------------------
@pytest.mark.parametrize("name", FEATURES)
def test_triton_forward_and_backward_equal_the_reference(name):
    from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton

    query, key, value, sinks = draw(5)
    indices = band_indices(query, WINDOW)  # 3 blocks a row (fewer at first): the window's edge block is kept
    gate = torch.rand(indices.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.5
    weights = torch.randn(1, 4, SEQ, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    results = []
    for attention in (block_sparse_attention, block_sparse_attention_triton):
        tensors = [t.clone().requires_grad_() for t in (query, key, value, gate, sinks)]
        features = settings(name, tensors[4])
        output, lse, mass = attention(*tensors[:3], indices, query_block=BLOCK, key_block=BLOCK, scale=SCALE,
                                      block_gate=tensors[3], **features)
        wanted = tensors[:4] + ([tensors[4]] if "sinks" in features else [])
        results.append((output, lse, mass, *torch.autograd.grad((output * weights).sum(), wanted)))
    for what, got, want in zip(["output", "lse", "block_mass", "dq", "dk", "dv", "dgate", "dsinks"], *results[::-1]):
        torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5, msg=lambda m: f"{name} {what}: {m}")


def test_triton_window_with_unequal_blocks_equals_the_oracle():
    """Query blocks of 32 over key blocks of 16 (query tiles span two key blocks of the band)."""
    from sparse_lens.kernels.sparse_attention_triton import block_sparse_attention_triton

    query, key, value, sinks = draw(11)
    band = window_band(SEQ, 32, 16, WINDOW, device=query.device)
    indices = band.expand(*query.shape[:2], *band.shape)
    tensors = [t.clone().requires_grad_() for t in (query, key, value)]
    output, lse, _ = block_sparse_attention_triton(*tensors, indices, query_block=32, key_block=16, scale=SCALE,
                                                   window=WINDOW, softcap=SOFTCAP)
    expected_out, expected_lse, _ = dense_softmax(*tensors, scale=SCALE, window=WINDOW, softcap=SOFTCAP)
    torch.testing.assert_close(output, expected_out, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse, expected_lse, atol=3e-5, rtol=3e-5)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    got = torch.autograd.grad((output * weights).sum(), tensors)
    want = torch.autograd.grad((expected_out * weights).sum(), tensors)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=3e-5, rtol=3e-5, msg=f"d {name}")


def test_triton_dense_band_and_masses_equal_the_oracle():
    from sparse_lens.kernels.block_mass_triton import block_mass_rows_triton, kept_block_mass_triton

    query, key, value, sinks = draw(7)
    features = dict(window=WINDOW, softcap=SOFTCAP, sinks=sinks)
    expected_out, expected_lse, probs = dense_softmax(query, key, value, scale=SCALE, **features)
    output, lse = dispatch.dense_attention(query, key, value, scale=SCALE, backend="triton", **features)
    torch.testing.assert_close(output, expected_out, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse, expected_lse, atol=3e-5, rtol=3e-5)
    mass_features = dict(window=WINDOW, softcap=SOFTCAP)
    rows = block_mass_rows_triton(query, key, lse, torch.arange(5), query_block=BLOCK, key_block=BLOCK, scale=SCALE,
                                  **mass_features)
    torch.testing.assert_close(rows, block_sums(probs), atol=3e-5, rtol=3e-5)
    indices = band_indices(query, WINDOW)
    kept = kept_block_mass_triton(query, key, indices, lse, query_block=BLOCK, key_block=BLOCK, scale=SCALE,
                                  **mass_features)
    torch.testing.assert_close(kept, block_sums(probs).gather(-1, indices.clamp(min=0)) * (indices >= 0),
                               atol=3e-5, rtol=3e-5)


# ----- dispatch, oracle, validation -----------------------------------------------------------
def test_dispatch_passes_the_features_through():
    query, key, value, sinks = draw(8)
    features = dict(window=WINDOW, softcap=SOFTCAP, sinks=sinks)
    expected_out, expected_lse, probs = dense_softmax(query, key, value, scale=SCALE, **features)
    output, lse = dispatch.dense_attention(query, key, value, scale=SCALE, backend="auto", **features)
    torch.testing.assert_close(output, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    # A decode step (query_offset) with a window: the last 5 queries against every key.
    decode_out, decode_lse = dispatch.dense_attention(query[:, :, -5:], key, value, scale=SCALE, query_offset=SEQ - 5,
                                                      **features)
    torch.testing.assert_close(decode_out, expected_out[:, :, -5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_lse, expected_lse[:, :, -5:], atol=1e-5, rtol=1e-5)
    indices = band_indices(query, WINDOW)
    sparse_out, _, _ = dispatch.block_sparse_attention(query, key, value, indices, query_block=BLOCK, key_block=BLOCK,
                                                       scale=SCALE, backend="reference", **features)
    torch.testing.assert_close(sparse_out, expected_out, atol=1e-5, rtol=1e-5)
    kept = dispatch.kept_block_mass(query, key, indices, lse, query_block=BLOCK, key_block=BLOCK, scale=SCALE,
                                    backend="reference", **features)
    torch.testing.assert_close(kept, block_sums(probs).gather(-1, indices.clamp(min=0)) * (indices >= 0),
                               atol=1e-5, rtol=1e-5)


def test_oracle_keeps_the_best_blocks_inside_the_window():
    query, key, value, sinks = draw(9, seq=120)
    features = dict(window=WINDOW, softcap=SOFTCAP, sinks=sinks)
    _, lse, probs = dense_softmax(query, key, value, scale=SCALE, **features)
    indices, mass = oracle_blocks(query, key, lse, query_block=BLOCK, key_block=BLOCK, top_k=3, scale=SCALE,
                                  backend="reference", **features)
    band = window_band(120, BLOCK, BLOCK, WINDOW)
    expected_mass = block_sums(probs)
    for row in range(band.shape[0]):
        candidates = [b for b in band[row].tolist() if b >= 0]
        for head in range(4):
            kept = [b for b in indices[0, head, row].tolist() if b >= 0]
            assert set(kept) <= set(candidates), (row, head, kept, candidates)
            best = sorted(candidates, key=lambda b: -float(expected_mass[0, head, row, b]))[:3]
            assert sorted(kept) == sorted(best), (row, head)
    torch.testing.assert_close(mass.sum(-1), expected_mass.gather(-1, indices.clamp(min=0)).mul(indices >= 0).sum(-1))


def test_bad_features_raise_named_errors():
    query, key, value, sinks = draw(10)
    indices = band_indices(query, None)
    call = lambda **kw: block_sparse_attention(query, key, value, indices, query_block=BLOCK,  # noqa: E731
                                               key_block=BLOCK, scale=SCALE, **kw)
    with pytest.raises(InvalidConfigError, match="window"):
        call(window=0)
    with pytest.raises(InvalidConfigError, match="softcap"):
        call(softcap=-1.0)
    with pytest.raises(ShapeError, match="sinks"):
        call(sinks=sinks[:3])
    with pytest.raises(InvalidConfigError, match="window"):
        dispatch.dense_attention(query, key, value, scale=SCALE, window=0)
