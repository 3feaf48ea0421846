"""A layer's sliding window and logit soft-cap, read from its HF attention module, the key
blocks a windowed layer keeps, and the check that a prefill is one unpadded sequence per row
(``check_one_sequence``: HF's mask under "flash_attention_2", and ``position_ids``).

Read generically (no architecture names), from the attributes HF attention modules carry:

- ``sliding_window(hf_attn)``: the module's own ``sliding_window`` (per layer: Gemma 2/3 local
  layers, Qwen2/3 with ``use_sliding_window``, Ministral; ``None`` on their global layers), else its
  config's (every layer: Mistral). Tokens; query ``i`` sees key ``j`` iff ``i - window < j <= i``.
- ``attention_softcap(hf_attn)``: ``attn_logit_softcapping`` (Gemma 2: 50.0), the tanh cap on the
  scaled scores, ``s -> softcap * tanh(s / softcap)``.

Policy, one for every bridge (``binding_window``): a window binds when it hides keys, i.e. when
there are more keys than the window. A window that does not bind (Mistral v0.1's 4096 below 4096
tokens, Phi-3-mini-128k's 262144) is no window: the layer is a global one and the estimator runs.
A layer whose window binds (``window_selection``) keeps its whole window band, the key blocks its
queries' windows overlap (``kernels.window.window_band``), and runs no estimator, so its attention
is exact (the kernels mask the window token by token inside the band's edge blocks).

- When the band fits the budget (``kernels.window.window_fits``: at most ``top_k`` blocks wide, e.g.
  Gemma 3's 512-token window with 64-token blocks and ``top_k >= 9``), the rows are padded with
  ``-1`` to ``top_k`` slots, so the layer's pattern stacks with the global layers' patterns.
- When it does not fit, the whole band is kept anyway (more than ``top_k`` blocks per row): the
  layer stays exact, its pattern is wider than ``top_k`` (it then does not stack with the global
  layers' patterns: ``PatternGeometryError``), and sparsity is estimated on the global layers only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from sparse_lens.errors import PaddingNotSupportedError
from sparse_lens.kernels.blocks import UNUSED_SLOT
from sparse_lens.kernels.window import window_band


def sliding_window(hf_attn: Any) -> int | None:
    """The HF attention module's sliding window in tokens, or None (a global layer)."""
    if hasattr(hf_attn, "sliding_window"):
        return hf_attn.sliding_window
    return getattr(getattr(hf_attn, "config", None), "sliding_window", None)


def attention_softcap(hf_attn: Any) -> float | None:
    """The HF attention module's logit soft-cap (``attn_logit_softcapping``), or None."""
    softcap = getattr(hf_attn, "attn_logit_softcapping", None)
    return None if softcap is None else float(softcap)


def binding_window(window: int | None, n_keys: int) -> int | None:
    """The window a layer applies over ``n_keys`` keys: ``window`` (tokens) when it hides some of
    them (``n_keys > window``), else ``None`` (the window hides nothing: no window, the estimator
    runs). The one window policy of both attention bridges (module docstring)."""
    return window if window is not None and n_keys > window else None


def window_selection(
    seq_len: int,
    *,
    batch: int,
    heads: int,
    query_block: int,
    key_block: int,
    top_k: int,
    window: int,
    device: torch.device,
) -> Int[Tensor, "batch head n_query_blocks width"]:
    """The block selection of a windowed layer: its whole window band for every batch row and
    head, ascending, ``-1`` in unused slots; ``width = max(top_k, band width)`` (see the module
    docstring for why the band is kept whole even when it is wider than ``top_k``)."""
    band = window_band(seq_len, query_block, key_block, window, device=device)
    band = F.pad(band, (0, max(0, top_k - band.shape[-1])), value=UNUSED_SLOT)
    return band.expand(batch, heads, *band.shape).contiguous()


def hides_nothing_more(attention_mask: Tensor, window: int | None) -> bool:
    """True when a 4-D HF prefill mask ``[batch, 1 | head, seq, seq]`` (boolean, or additive with
    0 for visible) hides nothing beyond causality and the layer's window, read from two rows in
    O(seq): the first query must see exactly key 0 and the last query exactly the keys of its
    window (all keys without one). Padding fails one of the two: a left pad row sees no key (or
    every key, where SDPA's fix unmasks fully masked rows), a right pad hides the last row's keys.
    HF hands such masks over when a window is at most the sequence length."""
    if attention_mask.ndim != 4:
        return False
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    n_keys = visible.shape[-1]
    key_pos = torch.arange(n_keys, device=visible.device)
    first_expected = key_pos == 0
    last_expected = key_pos > n_keys - 1 - (n_keys if window is None else window)
    return bool((visible[..., 0, :] == first_expected).all()) and bool((visible[..., -1, :] == last_expected).all())


def check_one_sequence(attention_mask: Tensor | None, position_ids: Tensor | None, window: int | None) -> None:
    """``PaddingNotSupportedError`` unless a prefill runs one unpadded sequence per batch row: HF's
    ``attention_mask`` (None, or a 4-D mask that ``hides_nothing_more`` than causality and the
    binding ``window``; a 2-D padding mask, which HF's "flash_attention_2" mask function passes
    when there is padding, is refused) and ``position_ids`` ``[batch, seq]`` counting up by one
    (HF reads restarts as packed sequences; the first position may be any, e.g. a
    sequence-parallel shard's). O(seq)."""
    if attention_mask is not None and not hides_nothing_more(attention_mask, window):
        raise PaddingNotSupportedError(
            "An attention mask reached sparse attention: padded batches are not supported. "
            "Run sequences of equal length (or one at a time)."
        )
    if position_ids is not None and position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) != 1).any()):
        raise PaddingNotSupportedError(
            "position_ids restart inside a row (packed sequences): sparse attention runs one causal "
            "sequence per batch row. Run the sequences one at a time (or as rows of equal length)."
        )
