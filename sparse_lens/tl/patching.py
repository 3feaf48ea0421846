"""TransformerLens' ``get_act_patch_attn_head_*_every`` helpers, for a sparse model.

TL's helpers run five sweeps in order: head output, query, key, value, then the attention
pattern. On a :class:`~sparse_lens.tl.model.HookedSparseTransformer` the pattern is a
:class:`~sparse_lens.pattern.BlockSparsePattern`, which has no dense ``[batch, head, query, key]``
entries to patch, so TL's last sweep raises ``DensePatternRequiredError`` after the other four
have run (one forward per layer x head (x position) each: minutes to hours on a long prompt).

These wrappers have TL's signature and check first: asked for the pattern sweep (the default,
as TL), they raise ``DensePatternRequiredError`` before any forward; with
``patch_types=("out", "q", "k", "v")`` they run the four sweeps that apply (through TL's own
per-type helpers) and stack them as TL does, ``[4, n_layers, (pos,) n_heads]``. For the pattern,
patch ``hook_block_indices`` or use the block-level tools (``sparse_lens.analysis``:
``block_attribution``, ``suppress_span``, ``path_patch``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import patching

from sparse_lens.errors import DensePatternRequiredError

PATCH_TYPES = ("out", "q", "k", "v", "pattern")  # TL's order (its patch_type_names)
SPARSE_PATCH_TYPES = ("out", "q", "k", "v")

_ALL_POS = {name: getattr(patching, f"get_act_patch_attn_head_{name}_all_pos") for name in PATCH_TYPES}
_BY_POS = {name: getattr(patching, f"get_act_patch_attn_head_{name}_by_pos") for name in PATCH_TYPES}


def check_patch_types(patch_types: Sequence[str]) -> tuple[str, ...]:
    """``patch_types`` validated: names of ``PATCH_TYPES`` without ``"pattern"``.

    Raises:
        DensePatternRequiredError: ``"pattern"`` is asked for (before anything runs).
        ValueError: an unknown or repeated name, or none.
    """
    patch_types = tuple(patch_types)
    if "pattern" in patch_types:
        raise DensePatternRequiredError(
            "TransformerLens' get_act_patch_attn_head_*_every helpers end with a sweep over hook_pattern, and a "
            "sparse model's pattern is a BlockSparsePattern, with no dense [batch, head, query, key] entries to "
            "patch: that sweep would fail after the out/q/k/v sweeps had run. Pass patch_types=('out', 'q', 'k', "
            "'v') for the four sweeps that apply, and patch blocks.{l}.attn.hook_block_indices or use "
            "sparse_lens.analysis (block_attribution, suppress_span, path_patch) for the pattern.")
    unknown = [name for name in patch_types if name not in SPARSE_PATCH_TYPES]
    if unknown or not patch_types or len(set(patch_types)) != len(patch_types):
        raise ValueError(f"patch_types must be distinct names of {SPARSE_PATCH_TYPES}, got {patch_types!r}")
    return patch_types


def _every(sweeps: dict[str, Callable], model: Any, corrupted_tokens: Tensor, clean_cache: Any,
           metric: Callable, patch_types: Sequence[str], kwargs: dict[str, Any]) -> Tensor:
    names = check_patch_types(patch_types)
    if kwargs.get("reduce", "scalar") != "scalar" or kwargs.get("baseline", False):
        raise ValueError("only TL's default tensor result (reduce='scalar', baseline=False) is wrapped here; "
                         "call TL's per-type helpers (transformer_lens.patching) for a PatchingResult")
    results = [sweeps[name](model, corrupted_tokens, clean_cache, metric, **kwargs) for name in names]
    n_heads = model.cfg.n_heads  # k and v of a model with fewer key-value heads: padded with zeros, as TL does
    padded = [torch.nn.functional.pad(result, (0, n_heads - result.shape[-1])) for result in results]
    return torch.stack(padded, dim=0)


def get_act_patch_attn_head_all_pos_every(
    model: Any, corrupted_tokens: Tensor, clean_cache: Any, metric: Callable, *,
    patch_types: Sequence[str] = PATCH_TYPES, **kwargs: Any,
) -> Float[Tensor, "patch_type layer head"]:
    """TL's helper of the same name with the pattern sweep refused up front.

    Args:
        model, corrupted_tokens, clean_cache, metric, kwargs: as
            ``transformer_lens.patching.get_act_patch_attn_head_all_pos_every``.
        patch_types: Sweeps to run, in this order; TL's default includes ``"pattern"``, which a
            sparse model refuses (pass ``("out", "q", "k", "v")``).

    Returns:
        ``[len(patch_types), n_layers, n_heads]``: each sweep's metric per layer and head (the key
        and value sweeps of a model with fewer key-value heads padded with zeros, as TL does).

    Raises:
        DensePatternRequiredError: ``"pattern"`` in ``patch_types``, before any forward.
    """
    return _every(_ALL_POS, model, corrupted_tokens, clean_cache, metric, patch_types, kwargs)


def get_act_patch_attn_head_by_pos_every(
    model: Any, corrupted_tokens: Tensor, clean_cache: Any, metric: Callable, *,
    patch_types: Sequence[str] = PATCH_TYPES, **kwargs: Any,
) -> Float[Tensor, "patch_type layer pos head"]:
    """As :func:`get_act_patch_attn_head_all_pos_every`, per position: ``[len(patch_types),
    n_layers, pos, n_heads]``; ``DensePatternRequiredError`` for ``"pattern"`` before any forward."""
    return _every(_BY_POS, model, corrupted_tokens, clean_cache, metric, patch_types, kwargs)
