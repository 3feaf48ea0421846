"""Layer-wise routes from the needle to the output, over the kept blocks only.

The route graph (method notes, "Layer-wise routes from needle to output"):

- a node ``(layer, q)`` is query block ``q`` at the output of ``layer``;
- layer ``l``'s edges go from ``(l, q)`` to the key blocks ``b`` that query block ``q`` keeps in
  some head; following one means "the residual of block q at layer l read block b's residual as
  it left layer l - 1", so the edge lands on node ``(l - 1, b')`` with ``b'`` the query block
  holding key block ``b``'s first token (the same index when query and key blocks are equal);
  the edges of layer 0 land on the input tokens;
- an edge's weight is the kept block mass reduced over heads: ``"mean"`` (sum over heads / number
  of heads; heads that do not keep the block count 0; ranks paths exactly as the sum does),
  ``"sum"`` or ``"max"``. A path takes one edge per layer, from the answer's query block at the
  last layer down to the input; the residual stream's identity path is not an edge.

**Scores are log-mass**: a path's score is the natural log of the product of its edge weights
(the log-probability of a random walk that takes one head-averaged attention step per layer), so
``-20`` reads "e^-20 of the mass". Products of 28 masses underflow floats at long contexts; sums of
logs do not. Two routes compare by their difference: ``-3`` is e^-3 = 5% of the other's mass.

``route_to_needle`` is exact: a dynamic programme (Viterbi) over the (layer, block) states,
vectorised over every kept edge with ``scatter_reduce`` (O(layers x query blocks x heads x top_k)
work and O(layers x query blocks) memory; one layer's edges at a time, no [blocks, blocks]
tensor). Two passes:

1. bottom-up, ``down[l][q]``: the best log-mass from node (l, q) down to the input;
2. top-down from the answer, ``reach[l][q]``: the best log-mass from the answer to node (l, q), and
   ``clean[l][q]``: the same over paths that have not read a needle block yet.

The best path is ``down`` followed from the answer. The best route whose *first* needle-reading
step (from the output down) is at layer ``l`` is the needle edge of layer ``l`` maximising
``clean[l][q] + log w + down[l - 1][b']``, followed up through ``clean``'s and down through
``down``'s back pointers. Every reported path's log-mass is the sum of its steps' log weights,
taken top-down, so the best path is never below a needle route (ties are resolved by that same
sum). Edges into the first ``skip_sink_blocks`` key blocks (the attention sink, which takes much
of most heads' mass and carries no content) are not followed unless they hold the needle.

Reading the result: max-product routes favour early blocks (a query block that sees few key
blocks gives each a large mass) and secondary sinks, so the unconstrained best path often settles
in the first blocks; the needle entries (which layer first reads the needle, from which block,
through which heads, at what log-mass relative to the best path) are the informative part.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sparse_lens.errors import (
    InvalidConfigError,
    InvalidPositionsError,
    InvalidSpanError,
    PatternGeometryError,
    ShapeError,
)
from sparse_lens.kernels.blocks import blocks_overlapping, num_blocks
from sparse_lens.pattern import BlockSparsePattern

HeadReduce = Literal["mean", "sum", "max"]
DEFAULT_MAX_EDGES = 2000


@dataclass(frozen=True)
class RouteStep:
    """One edge of a route: at ``layer``, query block ``query_block`` reads key block ``key_block``.

    ``mass``: the edge weight (block mass reduced over heads, a probability, not a log);
    ``heads``: ``(head, block mass)`` of every head keeping this block, heaviest first; ``needle``:
    the key block overlaps the needle.
    """

    layer: int
    query_block: int
    key_block: int
    mass: float
    heads: tuple[tuple[int, float], ...]
    needle: bool

    def describe(self, max_heads: int = 3) -> str:
        heads = ", ".join(f"H{head} {mass:.2f}" for head, mass in self.heads[:max_heads])
        more = f", +{len(self.heads) - max_heads}" if len(self.heads) > max_heads else ""
        flag = "  <- needle" if self.needle else ""
        return f"L{self.layer}: {self.query_block} -> {self.key_block} (mass {self.mass:.3f}; {heads}{more}){flag}"


@dataclass(frozen=True)
class RoutePath:
    """Steps from the top layer down (one per layer) and their log-mass.

    ``log_score``: the natural log of the product of the steps' masses (log-mass), summed top-down.
    ``entry_layer``: for a needle route, the layer whose step first enters the needle (else None)."""

    steps: tuple[RouteStep, ...]
    log_score: float
    entry_layer: int | None = None

    @property
    def score(self) -> float:
        """``exp(log_score)``: the product of the masses (underflows to 0 on long routes)."""
        return math.exp(self.log_score)

    @property
    def nodes(self) -> list[tuple[int, int]]:
        """(layer, query block) of every step, top layer first."""
        return [(step.layer, step.query_block) for step in self.steps]

    @property
    def needle_entry(self) -> RouteStep | None:
        """The step at ``entry_layer`` if set, else the first step (from the output down) that
        reads a needle block; None if none does."""
        if self.entry_layer is not None:
            return next(step for step in self.steps if step.layer == self.entry_layer)
        return next((step for step in self.steps if step.needle), None)


@dataclass(frozen=True)
class Route:
    """Result of ``route_to_needle`` (exact; scores are natural-log masses).

    Attributes:
        paths: ``(best path,)``, the highest log-mass path from the answer block at the last layer
            to the input (a tuple for compatibility with the former beam search); empty if no path
            reaches the input.
        needle_entries: one complete route per layer ``l`` where the needle can be entered: the
            best path from the answer to the input whose first needle-reading step is at layer
            ``l``, ``entry_layer = l``; highest log-mass first. Every path spans all layers, so
            entries at different layers compare, and none is above ``best``.
        edges: the ``max_edges`` edges with the highest log-mass of a complete route through them,
            ``(layer, query block, key block, weight)`` (for plots).
    """

    paths: tuple[RoutePath, ...]
    needle_entries: tuple[RoutePath, ...]
    edges: tuple[tuple[int, int, int, float], ...]
    needle_span: tuple[int, int]
    needle_blocks: tuple[int, ...]
    answer_position: int
    answer_block: int
    n_layers: int
    n_heads: int
    n_query_blocks: int
    query_block: int
    key_block: int
    head_reduce: str
    skip_sink_blocks: int

    @property
    def beam(self) -> None:
        """Deprecated: the search is exact (it was a beam width); always None."""
        warnings.warn("Route.beam is deprecated: route_to_needle is exact.", DeprecationWarning, stacklevel=2)
        return None

    @property
    def best(self) -> RoutePath | None:
        return self.paths[0] if self.paths else None

    @property
    def best_entry(self) -> RoutePath | None:
        """The highest log-mass complete route through the needle."""
        return self.needle_entries[0] if self.needle_entries else None

    def entry_layers(self) -> list[int]:
        """Layers where a route from the answer can first enter the needle, best route first."""
        return [path.entry_layer for path in self.needle_entries]

    def needle_node_blocks(self) -> tuple[int, ...]:
        """Query blocks (route nodes) holding the needle's tokens."""
        return tuple(blocks_overlapping(self.needle_span, self.query_block))

    def summary(self, max_entries: int = 5) -> str:
        lines = [
            f"Route from position {self.answer_position} (query block {self.answer_block}) at layer "
            f"{self.n_layers - 1} back to the input: exact, head_reduce {self.head_reduce!r}, "
            f"{self.skip_sink_blocks} sink block(s) skipped; scores are log-mass (natural log).",
            f"Needle tokens [{self.needle_span[0]}, {self.needle_span[1]}) = key blocks {list(self.needle_blocks)}.",
        ]
        best = self.best
        if best is None:
            lines.append("No path reaches the input (every edge skipped or of zero mass).")
        else:
            lines.append(f"Best path (log-mass {best.log_score:.3f}), layer: query block -> key block:")
            lines += ["  " + step.describe() for step in best.steps]
            entry = best.needle_entry
            lines.append(
                f"The needle enters the best path at layer {entry.layer} (query block {entry.query_block} -> "
                f"key block {entry.key_block}, mass {entry.mass:.3f}, heads "
                + ", ".join(f"H{h} {m:.2f}" for h, m in entry.heads) + ")."
                if entry else "The needle does not enter the best path."
            )
        if self.needle_entries:
            lines.append("Best complete routes through the needle, by first entry layer (log-mass, and its "
                         "difference to the best path; query block -> needle block, mass, heads):")
            for path in self.needle_entries[:max_entries]:
                step = path.needle_entry
                heads = ", ".join(f"H{h} {m:.2f}" for h, m in step.heads[:4])
                lines.append(f"  L{step.layer}: {path.log_score:.3f} ({path.log_score - best.log_score:+.3f}); "
                             f"{step.query_block} -> {step.key_block}, mass {step.mass:.3f}, {heads}")
            if len(self.needle_entries) > max_entries:
                lines.append(f"  ... {len(self.needle_entries) - max_entries} more layers")
        else:
            lines.append("No path reads a needle block.")
        return "\n".join(lines)


def needle_key_blocks(needle_span: tuple[int, int], key_block: int) -> tuple[int, ...]:
    """Key blocks overlapping the token span ``[start, end)``."""
    return tuple(blocks_overlapping(needle_span, key_block))


@dataclass(frozen=True)
class _Edges:
    """One layer's followed edges, deduplicated over heads (E edges, sorted by (row, key block))."""

    rows: Int[Tensor, "E"]  # query block (node) the edge leaves
    blocks: Int[Tensor, "E"]  # key block it reads
    targets: Int[Tensor, "E"]  # node of layer - 1 it lands on
    weights: Float[Tensor, "E"]  # float64 head-reduced mass, > 0
    needle: Bool[Tensor, "E"]  # the key block overlaps the needle


def _layer_edges(pattern: BlockSparsePattern, batch: int, head_reduce: str, skip_sink_blocks: int,
                 needle_blocks: tuple[int, int], node_scale: tuple[int, int]) -> _Edges:
    """The kept (query block, key block) edges of one layer with their head-reduced weights,
    leaving out unused slots, zero weights and skipped sink blocks (O(heads x rows x top_k); no
    boolean gathers, which are slow on a CPU at a million tokens). ``needle_blocks``: the first
    and last needle key block."""
    key_block, query_block = node_scale
    indices = pattern.block_indices[batch]  # [head, rows, top_k]
    mass = pattern.block_mass[batch].detach().double()
    n_heads, n_rows, _ = indices.shape
    n_key_blocks = num_blocks(pattern.seq_len, pattern.key_block)
    first_needle, last_needle = needle_blocks
    in_needle = (indices >= first_needle) & (indices <= last_needle)
    usable = (indices >= max(skip_sink_blocks, 0)) | in_needle
    rows = torch.arange(n_rows, device=indices.device)[None, :, None]
    unused = n_rows * n_key_blocks  # a key above every edge's: sorts last, dropped below
    keys = torch.where(usable, rows * n_key_blocks + indices, unused)  # one id per (row, key block)
    unique, inverse = torch.unique(keys, return_inverse=True)
    mass = torch.where(usable, mass, 0.0)
    weights = torch.zeros(len(unique), dtype=torch.float64, device=indices.device)
    if head_reduce == "max":
        weights = weights.scatter_reduce(0, inverse.flatten(), mass.flatten(), reduce="amax", include_self=False)
    else:
        weights = weights.index_add(0, inverse.flatten(), mass.flatten()) / (n_heads if head_reduce == "mean" else 1)
    positive = (weights > 0) & (unique < unused)
    unique, weights = unique[positive], weights[positive]
    blocks = unique % n_key_blocks
    return _Edges(unique // n_key_blocks, blocks, blocks * key_block // query_block, weights,
                  (blocks >= first_needle) & (blocks <= last_needle))


def _max_by_node(values: Tensor, nodes: Tensor, n_nodes: int) -> tuple[Tensor, Tensor]:
    """Per node: the max of ``values`` over the edges grouped on it (-inf if none) and the index of
    the first edge achieving it (-1 if none), vectorised."""
    best = torch.full((n_nodes,), -math.inf, dtype=values.dtype, device=values.device)
    best = best.scatter_reduce(0, nodes, values, reduce="amax", include_self=True)
    edge_ids = torch.arange(len(values), device=values.device)
    winners = torch.where((values == best[nodes]) & torch.isfinite(values), edge_ids, len(values))
    first = torch.full((n_nodes,), len(values), dtype=torch.int64, device=values.device)
    first = first.scatter_reduce(0, nodes, winners, reduce="amin", include_self=True)
    return best, torch.where(first < len(values), first, -1)


def _pick(values: Tensor, edge: Tensor, fill: float) -> Tensor:
    """``values[edge]`` on the CPU, ``fill`` where ``edge`` is -1 (no edge; also when there are none)."""
    if not len(values):
        return torch.full(edge.shape, fill, dtype=values.dtype)
    return torch.where(edge >= 0, values[edge.clamp(min=0)], fill).cpu()


def _step(pattern: BlockSparsePattern, batch: int, layer: int, query_block: int, key_block: int, weight: float,
          needle_blocks: set[int]) -> RouteStep:
    indices = pattern.block_indices[batch, :, query_block]
    mass = pattern.block_mass[batch, :, query_block]
    hits = (indices == key_block).nonzero(as_tuple=False).tolist()
    heads = sorted(((head, float(mass[head, slot])) for head, slot in hits), key=lambda item: -item[1])
    return RouteStep(layer, query_block, key_block, weight, tuple(heads), key_block in needle_blocks)


def _path(steps: list[RouteStep], entry_layer: int | None = None) -> RoutePath:
    """A path whose log-mass is the sum of its steps' log masses, top-down (the one way every
    reported score is computed, so that scores of equal paths are equal)."""
    return RoutePath(tuple(steps), math.fsum(math.log(step.mass) for step in steps), entry_layer)


def _validate(patterns: Sequence[BlockSparsePattern], needle_span: tuple[int, int], answer_position: int,
              head_reduce: str, batch: int, max_edges: int) -> None:
    if head_reduce not in ("mean", "sum", "max"):
        raise InvalidConfigError(f"head_reduce must be 'mean', 'sum' or 'max', got {head_reduce!r}.")
    if max_edges < 0:
        raise InvalidConfigError(f"max_edges must be >= 0, got {max_edges}.")
    if not patterns:
        raise PatternGeometryError("route_to_needle needs one pattern per layer; got none.")
    first = patterns[0]
    geometry = (first.seq_len, first.query_block, first.key_block, first.block_indices.shape[:2])
    for pattern in patterns:
        if (pattern.seq_len, pattern.query_block, pattern.key_block, pattern.block_indices.shape[:2]) != geometry:
            raise PatternGeometryError("Every layer's pattern must share seq_len, block sizes, batch and heads.")
        if pattern.is_sliced:
            raise PatternGeometryError("route_to_needle needs whole patterns; one was sliced along queries.")
    seq_len = first.seq_len
    if not 0 <= batch < first.block_indices.shape[0]:
        raise ShapeError(f"batch {batch} is not in the patterns' batch of {first.block_indices.shape[0]}.")
    if not 0 <= needle_span[0] < needle_span[1] <= seq_len:
        raise InvalidSpanError(f"needle_span {tuple(needle_span)} is not a non-empty span inside [0, {seq_len}).")
    if not -seq_len <= answer_position < seq_len:
        raise InvalidPositionsError(f"answer_position {answer_position} is outside the {seq_len} positions.")


def route_to_needle(
    patterns: Sequence[BlockSparsePattern],
    needle_span: tuple[int, int],
    answer_position: int = -1,
    beam: int | None = None,
    *,
    head_reduce: HeadReduce = "mean",
    skip_sink_blocks: int = 1,
    batch: int = 0,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> Route:
    """The exact best route from the answer position's query block at the last layer to the input,
    and per layer the best route that first enters the needle there (see the module docstring).

    Args:
        patterns: one ``BlockSparsePattern`` per layer, in layer order (sparse or observe mode),
            not sliced along queries; only ``block_indices`` and ``block_mass`` are read, on the
            patterns' device. Patterns without a batch axis (``run_with_cache(remove_batch_dim=True)``)
            are read as a batch of one.
        needle_span: the needle's token span ``[start, end)``.
        answer_position: the token whose query block the routes start from (negative: from the end).
        beam: deprecated and ignored (the former beam width; the search is now exact).
        head_reduce: how an edge's weight combines the heads keeping the block.
        skip_sink_blocks: key blocks ``< skip_sink_blocks`` are not followed unless in the needle.
        batch: the batch row.
        max_edges: how many edges (those on the best routes) ``Route.edges`` keeps for plots.

    Returns:
        a ``Route``; path scores are natural-log masses.

    Raises:
        PatternGeometryError: no patterns, patterns of different geometry, or sliced ones.
        InvalidSpanError: an empty needle span or one outside the sequence.
        InvalidPositionsError: an answer position outside the sequence.
        ShapeError: a batch row out of range.
        InvalidConfigError: an unknown ``head_reduce``, a negative ``max_edges``.
    """
    if beam is not None:
        warnings.warn("route_to_needle(beam=...) is deprecated and ignored: the route is an exact dynamic "
                      "programme now.", DeprecationWarning, stacklevel=2)
    patterns = [pattern if pattern.has_batch_dim else pattern.unsqueeze(0) for pattern in patterns]
    _validate(patterns, needle_span, answer_position, head_reduce, batch, max_edges)
    first = patterns[0]
    seq_len, qb, kb = first.seq_len, first.query_block, first.key_block
    n_layers, n_nodes = len(patterns), num_blocks(seq_len, qb)
    position = answer_position % seq_len
    answer_block = position // qb
    needle_blocks = needle_key_blocks(needle_span, kb)
    needle_set = set(needle_blocks)

    def edges_of(layer: int) -> _Edges:
        return _layer_edges(patterns[layer], batch, head_reduce, skip_sink_blocks,
                            (needle_blocks[0], needle_blocks[-1]), (kb, qb))

    # 1. Bottom-up: down[l][q], the best log-mass from (l, q) to the input, and its edge.
    downs: list[Tensor] = []
    down_block: list[Tensor] = []
    down_weight: list[Tensor] = []
    for layer in range(n_layers):
        edges = edges_of(layer)
        value = edges.weights.log() + (downs[-1][edges.targets] if downs else 0.0)
        best, edge = _max_by_node(value, edges.rows, n_nodes)
        downs.append(best)
        down_block.append(_pick(edges.blocks, edge, -1))
        down_weight.append(_pick(edges.weights, edge, 0.0))

    # 2. Top-down from the answer: reach (any path) and clean (no needle read yet), with clean's
    #    back pointers; the best needle entry of each layer; the edges on the best routes.
    device = downs[0].device
    reach = torch.full((n_nodes,), -math.inf, dtype=torch.float64, device=device)
    reach[answer_block] = 0.0
    clean = reach.clone()
    clean_from: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * n_layers  # (row, block, weight) per node
    entries_raw: list[tuple[int, int, int, float]] = []  # (layer, query block, key block, weight)
    kept_edges: list[tuple[Tensor, ...]] = []
    for layer in reversed(range(n_layers)):
        edges = edges_of(layer)
        log_w = edges.weights.log()
        below = downs[layer - 1][edges.targets] if layer else torch.zeros_like(log_w)
        through = reach[edges.rows] + log_w + below
        entry = torch.where(edges.needle, clean[edges.rows] + log_w + below, -math.inf)
        if len(entry) and bool(torch.isfinite(entry.max())):
            e = int(entry.argmax())
            entries_raw.append((layer, int(edges.rows[e]), int(edges.blocks[e]), float(edges.weights[e])))
        finite = torch.isfinite(through)
        top = torch.topk(through[finite], min(max_edges, int(finite.sum()))).indices
        kept_edges.append((torch.full_like(top, layer), edges.rows[finite][top], edges.blocks[finite][top],
                           edges.weights[finite][top], through[finite][top]))
        if layer == 0:
            break
        reach, _ = _max_by_node(reach[edges.rows] + log_w, edges.targets, n_nodes)
        clean_value = torch.where(edges.needle, -math.inf, clean[edges.rows] + log_w)
        clean, edge = _max_by_node(clean_value, edges.targets, n_nodes)
        clean_from[layer - 1] = (_pick(edges.rows, edge, -1), _pick(edges.blocks, edge, -1),
                                 _pick(edges.weights, edge, 0.0))

    def down_steps(layer: int, node: int) -> list[RouteStep]:
        """The best steps from node (layer, node) down to the input."""
        steps = []
        for lower in reversed(range(layer + 1)):
            block = int(down_block[lower][node])
            steps.append(_step(patterns[lower], batch, lower, node, block, float(down_weight[lower][node]), needle_set))
            node = block * kb // qb
        return steps

    def up_steps(layer: int, node: int) -> list[RouteStep]:
        """The best needle-free steps from the answer down to node (layer, node), top layer first."""
        steps = []
        for upper in range(layer + 1, n_layers):
            rows, blocks, weights = clean_from[upper - 1]
            row = int(rows[node])
            steps.append(_step(patterns[upper], batch, upper, row, int(blocks[node]), float(weights[node]), needle_set))
            node = row
        return list(reversed(steps))

    paths = ()
    if bool(torch.isfinite(downs[-1][answer_block])):
        paths = (_path(down_steps(n_layers - 1, answer_block)),)
    entries = []
    for layer, node, block, weight in entries_raw:
        steps = up_steps(layer, node) + [_step(patterns[layer], batch, layer, node, block, weight, needle_set)]
        steps += down_steps(layer - 1, block * kb // qb) if layer else []
        entries.append(_path(steps, entry_layer=layer))
    entries.sort(key=lambda path: -path.log_score)
    if entries and (not paths or entries[0].log_score > paths[0].log_score):
        # Only a rounding tie can put a needle route above the exact best path: report it as the best.
        paths = (RoutePath(entries[0].steps, entries[0].log_score),)
    layer_ids, rows, blocks, weights, through = (torch.cat(column) for column in zip(*kept_edges))
    order = torch.topk(through, min(max_edges, len(through))).indices.cpu()
    edge_list = tuple(zip(layer_ids.cpu()[order].tolist(), rows.cpu()[order].tolist(), blocks.cpu()[order].tolist(),
                          weights.cpu()[order].tolist()))
    return Route(
        paths=paths, needle_entries=tuple(entries), edges=edge_list, needle_span=tuple(needle_span),
        needle_blocks=needle_blocks, answer_position=position, answer_block=answer_block, n_layers=n_layers,
        n_heads=first.block_indices.shape[1], n_query_blocks=n_nodes, query_block=qb, key_block=kb,
        head_reduce=head_reduce, skip_sink_blocks=skip_sink_blocks,
    )
