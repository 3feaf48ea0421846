"""The dense side of fidelity: one observe-mode run kept for scoring (:class:`DenseTrace`).

:func:`collect_dense` runs the model once with dense attention and keeps its logits and each
layer's rotated q, k and dense lse, so that :func:`~sparse_lens.analysis.fidelity_metrics.fidelity`
can score several configs on one dense run. A trace remembers the tokens and a fingerprint of the
model it was made with (:func:`model_fingerprint`), and refuses to be compared with others
(``TraceMismatchError``). :func:`check_logits_fit` refuses up front, with a named error, logits
that would not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.errors import ContextTooLongError, ShapeError, TraceMismatchError
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl import memory
from sparse_lens.tl.model import HookedSparseTransformer


@dataclass
class DenseTrace:
    """One dense (observe-mode) run: logits and each layer's rotated q, k and dense lse.

    Holds every layer's q and k (``T * d_head`` per head and layer): for reusing one dense run
    across several configs at moderate lengths; ``fidelity`` without ``dense=`` needs none of it.
    ``tokens`` (on the CPU) are the token ids it was made from, so that ``fidelity`` can refuse a
    trace of other tokens (``None``: unknown, only the batch and length are checked).
    ``window`` / ``softcap`` / ``sinks``: per layer, the sliding window that binds at this length
    (tokens), logit soft-cap and sink logits [head] of the patterns (``None`` for the list: every
    layer plain, as traces saved before they were recorded).
    ``model``: the :func:`model_fingerprint` of the model it was made with, so that ``fidelity``
    can refuse a trace of another model (``None``: unknown, only the number of layers is checked).
    """

    logits: Float[Tensor, "batch pos vocab"]
    query: list[Tensor]
    key: list[Tensor]
    lse: list[Tensor]
    scale: float
    tokens: Int[Tensor, "batch pos"] | None = None
    window: list[int | None] | None = None
    softcap: list[float | None] | None = None
    sinks: list[Tensor | None] | None = None
    model: dict | None = None

    def features(self, layer: int) -> dict:
        """Layer ``layer``'s ``window`` / ``softcap`` / ``sinks`` (keyword arguments of the kernels)."""
        return {name: None if values is None else values[layer]
                for name, values in (("window", self.window), ("softcap", self.softcap), ("sinks", self.sinks))}

    def check_tokens(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Raise ``TraceMismatchError`` unless this trace was made from ``tokens``."""
        if tuple(tokens.shape) != tuple(self.logits.shape[:2]):
            raise TraceMismatchError(
                f"The dense trace was made from tokens of shape {tuple(self.logits.shape[:2])} [batch, pos], "
                f"these tokens have shape {tuple(tokens.shape)}: collect_dense(model, tokens) on these tokens.")
        if self.tokens is not None and not torch.equal(self.tokens, tokens.detach().cpu()):
            raise TraceMismatchError("The dense trace was made from other tokens (same shape): "
                                     "collect_dense(model, tokens) on these tokens.")

    def check_model(self, model: HookedSparseTransformer) -> None:
        """Raise ``TraceMismatchError`` unless this trace was made with ``model`` (its
        :func:`model_fingerprint`; a trace without one: its number of layers). A copy of the same
        weights in another dtype is refused too, the message saying so (the trace's values carry
        its dtype's rounding)."""
        if self.model is not None:
            found = model_fingerprint(model)
            # A name the trace's fingerprint lacks (one saved before it was recorded) is not compared.
            differ = [name for name in found if name in self.model and found[name] != self.model[name]]
            if "dtype" in differ and set(differ) <= {"dtype", "weights"} and _same_weights_up_to_rounding(
                    model, found["dtype"], self.model):
                raise TraceMismatchError(
                    f"The dense trace was made with the same weights in another dtype: {self.model['dtype']} "
                    f"(the trace) vs {found['dtype']} (this model). Its logits, q, k and lse carry that dtype's "
                    "rounding, which the figures would count as the sparse trace's error: collect the dense "
                    "trace with the model in the dtype you compare (collect_dense(model, tokens) with this "
                    f"model), or cast this model to {self.model['dtype']}.")
            if differ:
                shown = ", ".join(f"{name} {self.model.get(name)!r} vs {found[name]!r}" for name in differ
                                  if name != "weights")
                raise TraceMismatchError(
                    f"The dense trace was made with another model (it differs in {', '.join(differ)}"
                    + (f": {shown}" if shown else "") + "): collect_dense(model, tokens) with this model.")
        if len(self.query) != model.cfg.n_layers:
            raise TraceMismatchError(f"The dense trace has {len(self.query)} layers, the model {model.cfg.n_layers}: "
                                     "it was made with another model; collect_dense(model, tokens) with this one.")


def model_fingerprint(model: HookedSparseTransformer, sample: int = 64) -> dict:
    """What tells one model from another, cheaply: ``cfg.model_name``, ``n_layers``, ``n_heads``,
    ``d_model``, ``d_vocab``, ``dtype`` (of its floating-point parameters, e.g. ``"float32"``;
    ``"bfloat16/float32"`` when mixed) and ``weights``: per parameter, the float64 sum of its first
    ``sample`` elements (computed on the CPU, so the same weights give the same figures on any
    device; a few kB copied, whatever the model's size). Two models of one config with different
    weights differ in ``weights``; a copy cast to another dtype in ``dtype`` and, by rounding, in
    ``weights``; a weight edit outside the sampled elements goes unnoticed."""
    cfg = model.cfg
    sums = tuple(float(values.sum()) for values in _weight_samples(model, sample))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return {"model_name": str(cfg.model_name), "n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads),
            "d_model": int(cfg.d_model), "d_vocab": int(cfg.d_vocab), "dtype": "/".join(dtypes), "weights": sums}


def _weight_samples(model: HookedSparseTransformer, sample: int) -> list[Tensor]:
    """Each (non-meta) parameter's first ``sample`` elements, float64 on the CPU."""
    return [parameter.detach().reshape(-1)[:sample].to("cpu", torch.float64)
            for parameter in model.parameters() if parameter.device.type != "meta"]


def _same_weights_up_to_rounding(model: HookedSparseTransformer, dtype: str, fingerprint: dict,
                                 sample: int = 64) -> bool:
    """Whether ``fingerprint["weights"]`` are ``model``'s (in ``dtype``) sampled sums up to the rounding of the
    coarser of the two dtypes: each element moves by at most ``eps`` of its magnitude (plus
    ``eps`` of the smallest normal, for subnormals), so each sum by ``eps * (sum |x| + sample *
    smallest_normal)``, ``eps = torch.finfo(coarser).eps`` (twice the unit roundoff: a margin)."""
    names = {*fingerprint["dtype"].split("/"), *dtype.split("/")}
    dtypes = [getattr(torch, name, None) for name in names]
    if not all(isinstance(dtype, torch.dtype) and dtype.is_floating_point for dtype in dtypes):
        return False
    eps = max(torch.finfo(dtype).eps for dtype in dtypes)
    smallest_normal = max(torch.finfo(dtype).smallest_normal for dtype in dtypes)
    samples = _weight_samples(model, sample)
    if len(samples) != len(fingerprint["weights"]):
        return False
    return all(abs(float(values.sum()) - theirs) <= eps * (float(values.abs().sum()) + sample * smallest_normal)
               for values, theirs in zip(samples, fingerprint["weights"]))


def check_logits_fit(model: HookedSparseTransformer, tokens: Tensor, forwards: int, caller: str) -> None:
    """Raise ``ContextTooLongError`` when ``forwards`` forwards' float32 logits at every position
    (``[batch, pos, d_vocab]`` each, plus the model-dtype original they are cast from) would not fit
    in the memory free where the logits are made (the unembedding's device)."""
    head = model.original_model.get_output_embeddings()
    device = next(head.parameters()).device if head is not None else tokens.device
    batch, seq_len = tokens.shape
    per_forward = batch * seq_len * model.cfg.d_vocab * (4 + (0 if model.cfg.dtype == torch.float32 else 2))
    needed, free = forwards * per_forward, memory.free_bytes(device)
    if needed > free:
        raise ContextTooLongError(
            f"{caller}: the next-token figures at all {seq_len} positions need [batch, pos, d_vocab] = "
            f"[{batch}, {seq_len}, {model.cfg.d_vocab}] float32 logits from {forwards} forward(s), about "
            f"{needed / 2**30:.3g} GiB, and {free / 2**30:.3g} GiB is free on {device}. Score a sample of "
            f"positions instead: sl.fidelity(model, tokens, positions=torch.linspace(0, {seq_len - 1}, 1024).long()) "
            "(logits at those positions only, no dense trace needed)."
        )


def collect_dense(model: HookedSparseTransformer, tokens: Int[Tensor, "batch pos"] | str) -> DenseTrace:
    """Run the model once with dense attention (observe mode), keeping what fidelity needs.

    ``tokens``: token ids ``[batch, pos]``, or a text (tokenized by ``model.to_tokens``).
    Keeps the logits at every position: ``ContextTooLongError`` when they would not fit
    (``sl.fidelity(..., positions=...)`` needs no dense trace)."""
    tokens = as_tokens(model, tokens)
    check_logits_fit(model, tokens, 1, "collect_dense")
    with torch.no_grad(), model.stream_settings(mode="observe", keep_qk=True):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns: list[BlockSparsePattern] = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    return DenseTrace(
        logits=logits.float(),
        query=[p.query for p in patterns],
        key=[p.key for p in patterns],
        lse=[p.lse for p in patterns],
        scale=patterns[0].scale,
        tokens=tokens.detach().cpu().clone(),
        window=[p.window for p in patterns],
        softcap=[p.softcap for p in patterns],
        sinks=[None if p.sinks is None else p.sinks.detach() for p in patterns],
        model=model_fingerprint(model),
    )



def as_tokens(model: HookedSparseTransformer, tokens: Int[Tensor, "batch pos"] | str) -> Int[Tensor, "batch pos"]:
    """Token ids as given, or a text tokenized by ``model.to_tokens`` (``[1, pos]``); else ``ShapeError``."""
    if isinstance(tokens, str):
        return model.to_tokens(tokens)
    if not isinstance(tokens, Tensor):
        raise ShapeError(f"tokens must be a [batch, pos] tensor of token ids or a text, got {type(tokens).__name__}.")
    if tokens.ndim != 2:
        raise ShapeError(f"tokens must be a [batch, pos] tensor of token ids, got shape {tuple(tokens.shape)} "
                         "(one sequence: tokens[None]).")
    return tokens
