"""sparse_lens.tl.windows: reading a layer's window and soft-cap, the window selection, and the
check of HF's prefill masks (against masks built token by token)."""

from types import SimpleNamespace

import pytest
import torch

import sparse_lens as sl

from sparse_lens.kernels.window import window_band
from sparse_lens.tl.windows import (
    attention_softcap,
    binding_window,
    check_one_sequence,
    hides_nothing_more,
    sliding_window,
    window_selection,
)

SEQ, WINDOW = 40, 8


def _visible(seq: int, window: int | None, pad_left: int = 0, pad_right: int = 0) -> torch.Tensor:
    """bool [1, 1, seq, seq]: query i sees key j (causal, in the window, neither a pad)."""
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    real = (torch.arange(seq) >= pad_left) & (torch.arange(seq) < seq - pad_right)
    return (visible & real[None, :])[None, None]


def test_window_and_softcap_are_read_from_the_module_then_its_config():
    assert sliding_window(SimpleNamespace(sliding_window=512, config=SimpleNamespace(sliding_window=4096))) == 512
    assert sliding_window(SimpleNamespace(sliding_window=None, config=SimpleNamespace(sliding_window=4096))) is None
    assert sliding_window(SimpleNamespace(config=SimpleNamespace(sliding_window=4096))) == 4096
    assert sliding_window(SimpleNamespace()) is None
    assert attention_softcap(SimpleNamespace(attn_logit_softcapping=50)) == 50.0
    assert attention_softcap(SimpleNamespace()) is None


@pytest.mark.parametrize("top_k", [2, 3, 8])
def test_window_selection_is_the_band_padded_to_top_k(top_k):
    selection = window_selection(SEQ, batch=2, heads=3, query_block=8, key_block=8, top_k=top_k, window=WINDOW,
                                 device=torch.device("cpu"))
    band = window_band(SEQ, 8, 8, WINDOW)  # 2 blocks wide
    assert selection.shape == (2, 3, 5, max(top_k, band.shape[-1])) and selection.is_contiguous()
    assert torch.equal(selection[..., : band.shape[-1]], band.expand(2, 3, -1, -1))
    assert bool((selection[..., band.shape[-1]:] == -1).all())
    # every key a query's window holds is in its row's blocks, and no row keeps a block its window misses
    for query in range(SEQ):
        row = set(selection[0, 0, query // 8].tolist()) - {-1}
        assert {key // 8 for key in range(max(0, query - WINDOW + 1), query + 1)} <= row


@pytest.mark.parametrize("additive", [False, True])
def test_masks_that_hide_nothing_beyond_causality_and_the_window_pass(additive):
    def as_mask(visible):
        return torch.where(visible, 0.0, torch.finfo(torch.float32).min) if additive else visible

    assert hides_nothing_more(as_mask(_visible(SEQ, None)), None)
    assert hides_nothing_more(as_mask(_visible(SEQ, WINDOW)), WINDOW)
    assert hides_nothing_more(as_mask(_visible(SEQ, SEQ)), SEQ)  # a window as long as the sequence
    assert not hides_nothing_more(as_mask(_visible(SEQ, WINDOW)), None)  # a window the layer does not have
    assert not hides_nothing_more(as_mask(_visible(SEQ, None)), WINDOW)  # a window the mask does not apply
    for pads in ({"pad_left": 3}, {"pad_right": 3}):
        assert not hides_nothing_more(as_mask(_visible(SEQ, WINDOW, **pads)), WINDOW), pads
        assert not hides_nothing_more(as_mask(_visible(SEQ, None, **pads)), None), pads


def test_a_pad_row_unmasked_by_sdpa_still_fails():
    """SDPA's fix gives a fully masked row every key: the first row then sees more than key 0."""
    visible = _visible(SEQ, WINDOW, pad_left=WINDOW + 2)
    visible[..., : WINDOW + 2, :] = True  # the pad rows, unmasked
    assert not hides_nothing_more(visible, WINDOW)
    assert not hides_nothing_more(torch.ones(SEQ, SEQ, dtype=torch.bool), None)  # not 4-D


def test_a_window_binds_only_when_it_hides_keys():
    """HF's window lets a query see the ``window`` most recent keys (itself included): it hides a
    key only when there are more keys than the window."""
    assert binding_window(8, 9) == 8
    assert binding_window(8, 8) is None  # as many keys as the window: nothing hidden
    assert binding_window(4096, 1000) is None  # Mistral v0.1 below 4096 tokens
    assert binding_window(None, 10**6) is None
    # the window really hides nothing at n_keys == window: its mask is the causal mask
    assert torch.equal(_visible(SEQ, SEQ), _visible(SEQ, None)) and not torch.equal(_visible(SEQ, SEQ - 1),
                                                                                      _visible(SEQ, None))


def test_a_prefill_must_be_one_unpadded_sequence_per_row():
    """HF's "flash_attention_2" mask function passes None (no padding) or the 2-D padding mask;
    packed sequences show as position_ids that restart."""
    positions = torch.arange(SEQ)[None]
    check_one_sequence(None, positions, None)
    check_one_sequence(None, positions + 128, None)  # a sequence-parallel shard starts past 0
    check_one_sequence(_visible(SEQ, WINDOW), positions, WINDOW)
    with pytest.raises(sl.PaddingNotSupportedError, match="padded"):
        check_one_sequence(torch.ones(1, SEQ, dtype=torch.bool).index_fill(1, torch.tensor([0]), False), positions, None)
    with pytest.raises(sl.PaddingNotSupportedError, match="padded"):
        check_one_sequence(_visible(SEQ, None, pad_left=2), positions, None)
    with pytest.raises(sl.PaddingNotSupportedError, match="packed"):
        check_one_sequence(None, torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ // 2)])[None], None)
