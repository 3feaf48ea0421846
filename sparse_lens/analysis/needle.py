"""Where does the answer position look? Needle blocks in the kept patterns, per layer and head.

- :func:`needle_recall`: from the patterns of a sparse run, whether the answer position's query
  block keeps a key block of the needle, and the mass the pattern gives it.
- :func:`needle_fidelity`: the same estimate against dense attention. For the answer position
  (the last prompt token), per needle, layer and head: the exact dense softmax mass on the
  needle's tokens (one O(T) row, never T x T) and whether the estimator keeps a needle block.
  Target: every head that puts >= 10% of its dense mass on the needle keeps its needle block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_lens.analysis.span_patching import check_spans
from sparse_lens.config import TracingConfig
from sparse_lens.data.niah import NeedleSample
from sparse_lens.errors import InvalidPositionsError, InvalidSpanError
from sparse_lens.kernels import estimate_blocks
from sparse_lens.kernels.blocks import blocks_overlapping, num_blocks
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl.windows import attention_softcap, binding_window, sliding_window, window_selection

if TYPE_CHECKING:
    from sparse_lens.analysis.dense_trace import DenseTrace
    from sparse_lens.tl.model import HookedSparseTransformer


@dataclass(frozen=True)
class NeedleRecall:
    """For the query block holding ``query_position``: per layer and head, whether a key block of
    the needle span is kept, and the attention mass the kept needle blocks receive."""

    kept: Bool[torch.Tensor, "layer head"]
    mass: Float[torch.Tensor, "layer head"]
    needle_blocks: tuple[int, ...]
    query_block: int

    @property
    def kept_fraction(self) -> float:
        return float(self.kept.float().mean())

    def layers_with_needle(self) -> list[int]:
        return [layer for layer in range(self.kept.shape[0]) if bool(self.kept[layer].any())]


def needle_recall(
    patterns: list[BlockSparsePattern], needle_span: tuple[int, int], query_position: int = -1, batch: int = 0
) -> NeedleRecall:
    """Needle recall at ``query_position`` (default: the last token) over a list of per-layer patterns
    (patterns without a batch axis, from ``run_with_cache(remove_batch_dim=True)``, are a batch of one).

    Raises:
        InvalidSpanError: ``needle_span`` is empty or reaches outside the patterns' sequence.
    """
    patterns = [pattern if pattern.has_batch_dim else pattern.unsqueeze(0) for pattern in patterns]
    first = patterns[0]
    ((start, end),) = check_spans([needle_span], first.seq_len)
    needle_span = (start, end)
    position = query_position % first.seq_len
    row = position // first.query_block - first.first_query_block
    needle_blocks = tuple(blocks_overlapping(needle_span, first.key_block))
    kept_rows, mass_rows = [], []
    for pattern in patterns:
        indices = pattern.block_indices[batch, :, row]  # [head, top_k]
        is_needle = torch.isin(indices, torch.tensor(needle_blocks, device=indices.device))
        kept_rows.append(is_needle.any(-1))
        mass_rows.append((pattern.block_mass[batch, :, row] * is_needle).sum(-1))
    return NeedleRecall(torch.stack(kept_rows).cpu(), torch.stack(mass_rows).float().cpu(), needle_blocks, row)


# ----- needle fidelity: the estimate against dense attention at the answer position ---------
NEEDLE_MASS_THRESHOLD = 0.10  # a "needle head" puts at least this share of its dense mass on the needle


@dataclass
class NeedleFidelity:
    """For the answer position (by default the last prompt token), per needle span, layer and head:
    the dense softmax mass on the needle's tokens and whether the estimator keeps a key block of
    the needle for the answer position's query block.

    A *needle head* (of a needle) puts at least ``threshold`` of its dense mass on that needle; the
    target is every needle head keeping its needle block (``missed_heads()`` empty).
    """

    needle_spans: list[tuple[int, int]]
    needle_blocks: list[tuple[int, ...]]  # key blocks overlapping each needle span
    answer_position: int
    query_block_index: int  # the answer position's query block (row of block_indices)
    needle_mass: Float[Tensor, "needle layer head"]  # dense softmax mass on the needle's tokens
    needle_mass_kept: Float[Tensor, "needle layer head"]  # ... on those of its tokens inside kept blocks
    kept: Bool[Tensor, "needle layer head"]  # a key block of the needle is kept
    row_recall: Float[Tensor, "layer head"]  # dense mass of the answer position inside the kept blocks
    threshold: float = NEEDLE_MASS_THRESHOLD
    stream: dict | None = None  # the TracingConfig that was estimated, as a dict

    def is_needle_head(self) -> Bool[Tensor, "needle layer head"]:
        return self.needle_mass >= self.threshold

    def needle_heads(self, needle: int | None = None) -> list[tuple[int, int, int]]:
        """(needle, layer, head) of every needle head (of one needle, or of all)."""
        return self._select(self.is_needle_head(), needle)

    def missed_heads(self, needle: int | None = None) -> list[tuple[int, int, int]]:
        """(needle, layer, head) of the needle heads whose needle block is not kept."""
        return self._select(self.is_needle_head() & ~self.kept, needle)

    def kept_share(self, needle: int | None = None) -> float | None:
        """Share of needle heads that keep their needle block (None when there is no needle head)."""
        heads = len(self.needle_heads(needle))
        return None if heads == 0 else 1.0 - len(self.missed_heads(needle)) / heads

    def needle_mass_recall(self, needle: int | None = None) -> float | None:
        """Dense needle mass inside kept blocks / dense needle mass, summed over the needle heads."""
        heads = self.is_needle_head()
        if needle is not None:
            heads = heads & (torch.arange(heads.shape[0]) == needle)[:, None, None]
        total = float(self.needle_mass[heads].sum())
        return None if total == 0 else float(self.needle_mass_kept[heads].sum()) / total

    def summary(self) -> dict[str, Any]:
        """Headline figures (all needles together, then per needle), JSON-ready."""
        per_needle = []
        for index, span in enumerate(self.needle_spans):
            per_needle.append({
                "span": list(span),
                "blocks": list(self.needle_blocks[index]),
                "needle_heads": len(self.needle_heads(index)),
                "kept_share": self.kept_share(index),
                "needle_mass_recall": self.needle_mass_recall(index),
                "max_needle_mass": float(self.needle_mass[index].max()),
                "missed": [[layer, head, round(float(self.needle_mass[index, layer, head]), 4)]
                           for _, layer, head in self.missed_heads(index)],
            })
        return {
            "answer_position": self.answer_position,
            "threshold": self.threshold,
            "needle_heads": len(self.needle_heads()),
            "missed_heads": len(self.missed_heads()),
            "kept_share": self.kept_share(),
            "needle_mass_recall": self.needle_mass_recall(),
            "answer_row_recall_mean": float(self.row_recall.mean()),
            "needles": per_needle,
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary plus every per (needle, layer, head) figure as nested lists."""
        return {
            **self.summary(),
            "stream": self.stream,
            "query_block_index": self.query_block_index,
            "needle_mass": self.needle_mass.tolist(),
            "needle_mass_kept": self.needle_mass_kept.tolist(),
            "kept": self.kept.tolist(),
            "row_recall": self.row_recall.tolist(),
        }

    def _select(self, mask: Bool[Tensor, "needle layer head"], needle: int | None) -> list[tuple[int, int, int]]:
        hits = [tuple(int(i) for i in index) for index in torch.nonzero(mask)]
        return [hit for hit in hits if needle is None or hit[0] == needle]


class NeedleProbe:
    """Accumulates needle fidelity layer by layer from each layer's rotated q and k, so that a
    whole run never holds more than one layer's q and k (``hooks`` captures them during a dense
    prefill; ``add_layer`` takes them from anywhere, e.g. a :class:`DenseTrace`)."""

    def __init__(
        self,
        needle_spans: list[tuple[int, int]],
        stream: TracingConfig,
        n_layers: int,
        *,
        answer_position: int = -1,
        threshold: float = NEEDLE_MASS_THRESHOLD,
    ):
        if not needle_spans:
            raise InvalidSpanError("needle_spans is empty: give the [start, end) token span of at least one needle.")
        self.needle_spans = [(int(start), int(end)) for start, end in needle_spans]
        self.stream, self.n_layers = stream, n_layers
        self.answer_position, self.threshold = answer_position, threshold
        self._layers: dict[int, dict[str, Tensor]] = {}
        self._pending_query: dict[int, Tensor] = {}
        self._seq_len: int | None = None
        self.seconds = 0.0  # time spent in add_layer (estimation and figures)

    def add_layer(
        self,
        layer: int,
        query: Float[Tensor, "batch q_head seq d_head"],
        key: Float[Tensor, "batch kv_head seq d_head"],
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        sinks: Float[Tensor, "q_head"] | None = None,
    ) -> None:
        """Estimate the layer's blocks with the probe's TracingConfig and record its figures (batch 0).

        ``window`` / ``softcap`` / ``sinks``: the layer's attention features, as the model runs it
        (a window that binds: the layer keeps its window band and runs no estimator, as
        :class:`~sparse_lens.tl.attention.SparseAttentionBridge` does; the answer row's softmax is
        the capped, windowed one with the sink in its normaliser)."""
        started = time.perf_counter()
        seq_len = query.shape[2]
        position = _check_needles(self.needle_spans, self.answer_position, seq_len)
        window = binding_window(window, seq_len)
        if window is not None:
            block_indices = window_selection(seq_len, batch=query.shape[0], heads=query.shape[1],
                                             query_block=self.stream.query_block, key_block=self.stream.key_block,
                                             top_k=self.stream.top_k, window=window, device=query.device)
        else:
            block_indices = estimate_blocks(query, key, scale=scale, **self.stream.estimator_kwargs())
        row = position // self.stream.query_block
        self._layers[layer] = _answer_row_figures(
            query[0, :, position], key[0, :, : position + 1], scale, block_indices[0, :, row],
            self.needle_spans, self.stream.key_block, window=window, softcap=softcap, sinks=sinks,
        )
        self._seq_len = seq_len
        self.seconds += time.perf_counter() - started

    def hooks(self, model: HookedSparseTransformer) -> list[tuple[str, Callable]]:
        """Forward hooks on every layer's ``hook_rot_q`` / ``hook_rot_k`` that feed ``add_layer``
        with the first (prefill) call of each layer; decode steps are ignored. TransformerLens
        hands these hooks [batch, pos, head, d_head] tensors."""
        hooks = []
        for layer in range(self.n_layers):
            scale = _attention_scale(model, layer)
            hf_attention = model.blocks[layer].attn.original_component
            features = {"window": sliding_window(hf_attention), "softcap": attention_softcap(hf_attention),
                        "sinks": getattr(hf_attention, "sinks", None)}

            def take_query(query: Tensor, hook: Any, layer: int = layer) -> None:
                if layer not in self._layers:
                    self._pending_query[layer] = query.detach().transpose(1, 2)

            def take_key(key: Tensor, hook: Any, layer: int = layer, scale: float = scale, features: dict = features) -> None:
                if layer not in self._layers and layer in self._pending_query:
                    sinks = features["sinks"]
                    self.add_layer(layer, self._pending_query.pop(layer), key.detach().transpose(1, 2), scale,
                                   **features | {"sinks": None if sinks is None else sinks.detach()})

            hooks += [(f"blocks.{layer}.attn.hook_rot_q", take_query), (f"blocks.{layer}.attn.hook_rot_k", take_key)]
        return hooks

    def result(self) -> NeedleFidelity:
        missing = [layer for layer in range(self.n_layers) if layer not in self._layers]
        if missing or self._seq_len is None:
            raise RuntimeError(f"NeedleProbe: no q and k were recorded for layers {missing}.")
        stacked = {name: torch.stack([self._layers[layer][name] for layer in range(self.n_layers)])
                   for name in self._layers[0]}
        position = self.answer_position % self._seq_len
        key_block = self.stream.key_block
        return NeedleFidelity(
            needle_spans=self.needle_spans,
            needle_blocks=[tuple(blocks_overlapping(span, key_block)) for span in self.needle_spans],
            answer_position=position,
            query_block_index=position // self.stream.query_block,
            needle_mass=stacked["needle_mass"].transpose(0, 1),
            needle_mass_kept=stacked["needle_mass_kept"].transpose(0, 1),
            kept=stacked["kept"].transpose(0, 1),
            row_recall=stacked["row_recall"],
            threshold=self.threshold,
            stream=self.stream.to_dict(),
        )


@torch.no_grad()
def needle_fidelity(
    model: HookedSparseTransformer,
    tokens: Int[Tensor, "batch pos"] | NeedleSample,
    needle_spans: list[tuple[int, int]] | None = None,
    stream: TracingConfig | None = None,
    *,
    answer_position: int = -1,
    threshold: float = NEEDLE_MASS_THRESHOLD,
    dense: DenseTrace | None = None,
) -> NeedleFidelity:
    """Needle fidelity of ``stream`` (default: the model's) at ``answer_position`` (default: the last
    token), against dense attention: one entry per needle span.

    ``tokens`` may be a :class:`~sparse_lens.data.NeedleSample` (its ``input_ids`` and
    ``needle_spans``). Pass ``dense=collect_dense(model, tokens)`` to reuse a dense run (a trace of
    other tokens, or made with another model, raises ``TraceMismatchError``); otherwise
    one dense forward runs here with hooks on ``hook_rot_q`` / ``hook_rot_k``. Batch 1.

    Raises:
        InvalidSpanError: no needle span, a malformed or empty one, or one not ending by the answer.
        InvalidPositionsError: ``answer_position`` outside ``[-T, T)``.
        TraceMismatchError: ``dense`` was made with another model or from other tokens.
    """
    if isinstance(tokens, NeedleSample):
        needle_spans = tokens.needle_spans if needle_spans is None else needle_spans
        tokens = torch.tensor([tokens.input_ids], device=model.cfg.device)
    if needle_spans is None:
        raise ValueError("needle_spans is required with a token tensor.")
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    _check_needles(needle_spans, answer_position, tokens.shape[-1])  # before any forward
    stream = stream or model.stream
    probe = NeedleProbe(needle_spans, stream, model.cfg.n_layers, answer_position=answer_position, threshold=threshold)
    if dense is not None:
        dense.check_model(model)  # a trace of another model or other tokens: TraceMismatchError
        dense.check_tokens(tokens)
        for layer in range(model.cfg.n_layers):
            probe.add_layer(layer, dense.query[layer], dense.key[layer], dense.scale, **dense.features(layer))
    else:
        with model.stream_settings(mode="dense"), model.hooks(fwd_hooks=probe.hooks(model)):
            model(tokens, logits_to_keep=1)  # the whole input: a query block's estimate reads all its queries
    return probe.result()


def _check_needles(needle_spans: list[tuple[int, int]], answer_position: int, seq_len: int) -> int:
    """The answer position in ``[0, seq_len)``; ``InvalidPositionsError`` for one outside
    ``[-seq_len, seq_len)`` (``%`` would wrap 70 to 6 at 64 tokens), ``InvalidSpanError`` for no
    span, a malformed or empty one, or one that does not end by the answer position."""
    if not -seq_len <= answer_position < seq_len:
        raise InvalidPositionsError(f"answer_position {answer_position} is outside the {seq_len} tokens.")
    position = answer_position % seq_len
    spans = check_spans(needle_spans, seq_len)
    if any(end > position + 1 for _, end in spans):
        raise InvalidSpanError(f"Needle spans {spans} must lie within [0, {position + 1}), before the answer position.")
    return position


def _answer_row_figures(
    query: Float[Tensor, "q_head d_head"],
    key: Float[Tensor, "kv_head n_keys d_head"],
    scale: float,
    kept_indices: Int[Tensor, "q_head width"],
    needle_spans: list[tuple[int, int]],
    key_block: int,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "q_head"] | None = None,
) -> dict[str, Tensor]:
    """Per head: the answer query's exact dense softmax row over its ``n_keys`` causal keys (O(T)),
    its mass on each needle, the part of that inside kept blocks, and the row's recall. The row is
    the layer's own: scores capped (``softcap * tanh(s / softcap)``), keys older than ``window``
    masked, a learned sink logit in the normaliser (its mass belongs to no key)."""
    n_q_heads, (n_kv_heads, n_keys, _) = query.shape[0], key.shape
    grouped = query.float().unflatten(0, (n_kv_heads, n_q_heads // n_kv_heads))  # q head h reads kv head h // group
    scores: Float[Tensor, "q_head n_keys"] = torch.einsum("vgd,vkd->vgk", grouped, key.float()).flatten(0, 1) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if window is not None:  # the answer query sits at n_keys - 1 and sees keys j > n_keys - 1 - window
        scores = scores.masked_fill(torch.arange(n_keys, device=scores.device) <= n_keys - 1 - window, float("-inf"))
    normaliser = torch.logsumexp(scores, dim=-1, keepdim=True)
    if sinks is not None:
        normaliser = torch.logaddexp(normaliser, sinks.float().to(scores.device)[:, None])
    probs = torch.exp(scores - normaliser)
    n_key_blocks = num_blocks(n_keys, key_block)  # the blocks the answer query sees
    kept_blocks: Bool[Tensor, "q_head n_key_blocks"] = torch.zeros(n_q_heads, n_key_blocks + 1, dtype=torch.bool, device=query.device)
    seen = (kept_indices >= 0) & (kept_indices < n_key_blocks)  # -1 slots (and non-causal blocks) go to a spare column
    kept_blocks.scatter_(1, torch.where(seen, kept_indices, n_key_blocks), True)
    kept_blocks = kept_blocks[:, :n_key_blocks]
    kept_keys: Bool[Tensor, "q_head n_keys"] = kept_blocks.repeat_interleave(key_block, dim=1)[:, :n_keys]
    needle_mass, needle_mass_kept, kept = [], [], []
    for start, end in needle_spans:
        needle_probs = probs[:, start:end]
        needle_mass.append(needle_probs.sum(-1))
        needle_mass_kept.append((needle_probs * kept_keys[:, start:end]).sum(-1))
        blocks = blocks_overlapping((start, end), key_block)
        kept.append(kept_blocks[:, blocks.start : blocks.stop].any(-1))
    return {
        "needle_mass": torch.stack(needle_mass).cpu(),
        "needle_mass_kept": torch.stack(needle_mass_kept).cpu(),
        "kept": torch.stack(kept).cpu(),
        "row_recall": (probs * kept_keys).sum(-1).cpu(),
    }


def _attention_scale(model: HookedSparseTransformer, layer: int) -> float:
    """The softmax scale the model's attention uses (as SparseAttentionBridge reads it)."""
    hf_attention = model.blocks[layer].attn.original_component
    scaling = getattr(hf_attention, "scaling", None)  # GPT-NeoX's module has scaling but no head_dim
    return float(scaling if scaling is not None else hf_attention.head_dim**-0.5)
