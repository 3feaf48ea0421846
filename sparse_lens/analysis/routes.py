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
  ``"sum"`` or ``"max"``. A path's score is the product of its edge weights (the probability of a
  random walk along attention that takes one head-averaged attention step per layer; the
  residual stream's identity path is not an edge).

``route_to_needle`` walks back from the answer position's query block at the last layer with a
beam search over nodes (Viterbi with the frontier cut to the ``beam`` best nodes per layer;
``beam=None`` keeps every node and is exact): O(L x beam x heads x top_k) work, and the graph
has O(L x T / block x top_k) edges at most. Edges into the first ``skip_sink_blocks`` key blocks
(the attention sink, which takes much of most heads' mass and carries no content) are not
followed unless they hold the needle.

Besides the surviving paths it reports, for every layer where the needle can be *entered* (the
first step, from the output down, whose key block overlaps the needle's tokens), the best
complete route through that entry: beam-searched from the answer down to the entry (each node
keeps its best path only, so an entry is found from a node whose best path has not read the
needle yet), and continued by the exact best route below it (a dynamic programme over every kept
edge of the lower layers, vectorised, O(edges)). All routes span every layer, so their scores
compare across entry layers.

Reading the result: max-product routes favour early blocks (a query block that sees few key
blocks gives each a large mass) and secondary sinks, so the unconstrained best path often settles
in the first blocks; the needle entries (which layer first reads the needle, from which block,
through which heads, at what cost relative to the best path) are the informative part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from sparse_lens.kernels.blocks import num_blocks
from sparse_lens.pattern import BlockSparsePattern

HeadReduce = Literal["mean", "sum", "max"]


@dataclass(frozen=True)
class RouteStep:
    """One edge of a route: at ``layer``, query block ``query_block`` reads key block ``key_block``.

    ``mass``: the edge weight (block mass reduced over heads); ``heads``: ``(head, block mass)`` of
    every head keeping this block, heaviest first; ``needle``: the key block overlaps the needle.
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
    """Steps from the top layer down (one per layer), and the log of the product of their masses.

    ``entry_layer``: for a needle route, the layer whose step enters the needle (else None)."""

    steps: tuple[RouteStep, ...]
    log_score: float
    entry_layer: int | None = None

    @property
    def score(self) -> float:
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
    """Result of ``route_to_needle``.

    Attributes:
        paths: the beam's paths from the answer block at the last layer to the input, best first.
        needle_entries: one complete route per layer ``l`` where the needle can be entered: the
            best path from the answer to the input whose first needle-reading step is at layer ``l``
            (beam-searched above ``l``, exact below it), ``entry_layer = l``; best score first.
            Scores are products over all layers, so entries at different layers compare.
        edges: every edge examined, ``(layer, query block, key block, weight)`` (for plots).
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
    beam: int | None
    head_reduce: str
    skip_sink_blocks: int

    @property
    def best(self) -> RoutePath | None:
        return self.paths[0] if self.paths else None

    @property
    def best_entry(self) -> RoutePath | None:
        """The highest-scoring complete route through the needle."""
        return self.needle_entries[0] if self.needle_entries else None

    def entry_layers(self) -> list[int]:
        """Layers where a route from the answer can enter the needle (within the beam), best first."""
        return [path.entry_layer for path in self.needle_entries]

    def needle_node_blocks(self) -> tuple[int, ...]:
        """Query blocks (route nodes) holding the needle's tokens."""
        first, last = self.needle_span[0] // self.query_block, (self.needle_span[1] - 1) // self.query_block
        return tuple(range(first, last + 1))

    def summary(self, max_entries: int = 5) -> str:
        lines = [
            f"Route from position {self.answer_position} (query block {self.answer_block}) at layer "
            f"{self.n_layers - 1} back to the input: beam {self.beam}, head_reduce {self.head_reduce!r}, "
            f"{self.skip_sink_blocks} sink block(s) skipped, {len(self.edges)} edges examined.",
            f"Needle tokens [{self.needle_span[0]}, {self.needle_span[1]}) = key blocks {list(self.needle_blocks)}.",
        ]
        best = self.best
        if best is None:
            lines.append("No path reaches the input (every edge skipped or of zero mass).")
        else:
            lines.append(f"Best path (score {best.score:.3g}), layer: query block -> key block:")
            lines += ["  " + step.describe() for step in best.steps]
            entry = best.needle_entry
            lines.append(
                f"The needle enters the best path at layer {entry.layer} (query block {entry.query_block} -> "
                f"key block {entry.key_block}, mass {entry.mass:.3f}, heads "
                + ", ".join(f"H{h} {m:.2f}" for h, m in entry.heads) + ")."
                if entry else "The needle does not enter the best path."
            )
        if self.needle_entries:
            reference = f" (best path: {best.score:.3g})" if best is not None else ""
            lines.append("Best complete routes through the needle, by entry layer (route score"
                         f"{reference}; query block -> needle block, mass, heads):")
            for path in self.needle_entries[:max_entries]:
                step = path.needle_entry
                heads = ", ".join(f"H{h} {m:.2f}" for h, m in step.heads[:4])
                lines.append(f"  L{step.layer}: {path.score:.3g}; {step.query_block} -> {step.key_block}, "
                             f"mass {step.mass:.3f}, {heads}")
            if len(self.needle_entries) > max_entries:
                lines.append(f"  ... {len(self.needle_entries) - max_entries} more layers")
        else:
            lines.append("No path within the beam reads a needle block.")
        return "\n".join(lines)


def needle_key_blocks(needle_span: tuple[int, int], key_block: int) -> tuple[int, ...]:
    """Key blocks overlapping the token span ``[start, end)``."""
    start, end = needle_span
    return tuple(range(start // key_block, (end - 1) // key_block + 1))


def _edges_of(pattern: BlockSparsePattern, batch: int, query_block: int, head_reduce: str):
    """Kept key blocks of one query block and their head-reduced weights: (blocks, weights) lists."""
    row = query_block - pattern.first_query_block
    if not 0 <= row < pattern.n_query_blocks:
        raise ValueError(f"Query block {query_block} is not held by this pattern (rows from {pattern.first_query_block}).")
    indices = pattern.block_indices[batch, :, row]  # [head, top_k]
    mass = pattern.block_mass[batch, :, row].float()
    used = indices >= 0
    blocks, inverse = torch.unique(indices[used], return_inverse=True)
    weights = torch.zeros(len(blocks), dtype=torch.float64, device=mass.device)
    if head_reduce == "max":
        weights = weights.scatter_reduce(0, inverse, mass[used].double(), reduce="amax", include_self=False)
    else:
        weights = weights.index_add(0, inverse, mass[used].double())
        if head_reduce == "mean":
            weights = weights / indices.shape[0]
    return blocks.tolist(), weights.tolist()


def _best_routes_down(
    patterns: Sequence[BlockSparsePattern], batch: int, head_reduce: str, skip_sink_blocks: int,
    needle: set[int], node_scale: tuple[int, int],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Exact best log-score from every node (layer, q) down to the input, over all kept edges
    (vectorised, O(edges) per layer): ``down[l][q]``, and the key block / weight achieving it."""
    key_block, query_block = node_scale
    downs, best_blocks, best_weights = [], [], []
    below = None  # log-score of the nodes under the current layer (0 for the input tokens)
    for pattern in patterns:
        indices = pattern.block_indices[batch].cpu()  # [head, rows, top_k]
        mass = pattern.block_mass[batch].detach().cpu().double()
        n_heads, n_rows, _ = indices.shape
        n_key_blocks = num_blocks(pattern.seq_len, pattern.key_block)
        rows = torch.arange(n_rows)[None, :, None].expand_as(indices)
        usable = indices >= 0
        if skip_sink_blocks:
            sink = indices < skip_sink_blocks
            if needle:
                sink &= ~torch.isin(indices, torch.tensor(sorted(needle)))
            usable &= ~sink
        keys = rows[usable] * n_key_blocks + indices[usable]
        unique, inverse = torch.unique(keys, return_inverse=True)
        weights = torch.zeros(len(unique), dtype=torch.float64)
        if head_reduce == "max":
            weights = weights.scatter_reduce(0, inverse, mass[usable], reduce="amax", include_self=False)
        else:
            weights = weights.index_add(0, inverse, mass[usable]) / (n_heads if head_reduce == "mean" else 1)
        edge_rows, edge_blocks = unique // n_key_blocks, unique % n_key_blocks
        value = torch.log(weights.clamp(min=1e-300)).masked_fill(weights <= 0, -math.inf)
        if below is not None:
            value = value + below[(edge_blocks * key_block // query_block).clamp(max=len(below) - 1)]
        down = torch.full((n_rows,), -math.inf, dtype=torch.float64)
        down = down.scatter_reduce(0, edge_rows, value, reduce="amax", include_self=True)
        is_best = (value == down[edge_rows]) & torch.isfinite(value)
        best_block = torch.full((n_rows,), -1, dtype=torch.int64)
        best_weight = torch.zeros(n_rows, dtype=torch.float64)
        best_block[edge_rows[is_best]] = edge_blocks[is_best]
        best_weight[edge_rows[is_best]] = weights[is_best]
        downs.append(down)
        best_blocks.append(best_block)
        best_weights.append(best_weight)
        below = down
    return downs, best_blocks, best_weights


def _step(pattern: BlockSparsePattern, batch: int, layer: int, query_block: int, key_block: int, weight: float,
          needle_blocks: set[int]) -> RouteStep:
    row = query_block - pattern.first_query_block
    indices = pattern.block_indices[batch, :, row]
    mass = pattern.block_mass[batch, :, row]
    hits = (indices == key_block).nonzero(as_tuple=False).tolist()
    heads = sorted(((head, float(mass[head, slot])) for head, slot in hits), key=lambda item: -item[1])
    return RouteStep(layer, query_block, key_block, weight, tuple(heads), key_block in needle_blocks)


def route_to_needle(
    patterns: Sequence[BlockSparsePattern],
    needle_span: tuple[int, int],
    answer_position: int = -1,
    beam: int | None = 4,
    *,
    head_reduce: HeadReduce = "mean",
    skip_sink_blocks: int = 1,
    batch: int = 0,
) -> Route:
    """Walk back from the answer position's query block at the last layer along the heaviest kept
    edges (beam search over nodes, ``beam`` best per layer; ``None``: exact) and report where the
    needle's key blocks enter the paths, through which layers and heads, with what mass.

    ``patterns``: one ``BlockSparsePattern`` per layer, in layer order (sparse or observe mode),
    not sliced along queries. ``needle_span``: the needle's token span ``[start, end)``.
    """
    if head_reduce not in ("mean", "sum", "max"):
        raise ValueError(f"head_reduce must be 'mean', 'sum' or 'max', got {head_reduce!r}.")
    if beam is not None and beam < 1:
        raise ValueError("beam must be >= 1 (or None for an exact search).")
    if not patterns:
        raise ValueError("No patterns.")
    first = patterns[0]
    seq_len, qb, kb = first.seq_len, first.query_block, first.key_block
    for pattern in patterns:
        if (pattern.seq_len, pattern.query_block, pattern.key_block) != (seq_len, qb, kb):
            raise ValueError("Every layer's pattern must share seq_len and block sizes.")
    if not 0 <= needle_span[0] < needle_span[1] <= seq_len:
        raise ValueError(f"needle_span {needle_span} is not inside [0, {seq_len}).")
    n_layers = len(patterns)
    position = answer_position % seq_len
    answer_block = position // qb
    needle_blocks = needle_key_blocks(needle_span, kb)
    needle_set = set(needle_blocks)

    def node_of(key_block: int) -> int:
        return key_block * kb // qb

    for pattern in patterns:
        if pattern.is_sliced:
            raise ValueError("route_to_needle needs whole patterns; one was sliced along queries.")
    downs, down_blocks, down_weights = _best_routes_down(patterns, batch, head_reduce, skip_sink_blocks, needle_set, (kb, qb))

    # node -> (log score from the answer, whether its best path already read a needle block)
    frontier: dict[int, tuple[float, bool]] = {answer_block: (0.0, False)}
    back: list[dict[int, tuple[float, int, int, float, bool]]] = [dict() for _ in range(n_layers)]
    needle_best: dict[int, tuple[float, float, int, int, float]] = {}  # layer -> (full, prefix, node, block, w)
    edges: list[tuple[int, int, int, float]] = []
    for layer in reversed(range(n_layers)):
        pattern = patterns[layer]
        arrivals = back[layer]  # next node -> (log score, from node, key block, weight, touched)
        for node, (log_score, touched) in frontier.items():
            blocks, weights = _edges_of(pattern, batch, node, head_reduce)
            for block, weight in zip(blocks, weights):
                edges.append((layer, node, block, weight))
                if weight <= 0 or (block < skip_sink_blocks and block not in needle_set):
                    continue
                candidate = log_score + math.log(weight)
                target = node_of(block)
                if block in needle_set and not touched:  # the first needle step of this path
                    below = 0.0 if layer == 0 else float(downs[layer - 1][target])
                    if candidate + below > needle_best.get(layer, (-math.inf,))[0]:
                        needle_best[layer] = (candidate + below, candidate, node, block, weight)
                if candidate > arrivals.get(target, (-math.inf,))[0]:
                    arrivals[target] = (candidate, node, block, weight, touched or block in needle_set)
        ranked = sorted(arrivals.items(), key=lambda item: -item[1][0])
        frontier = {node: (entry[0], entry[4]) for node, entry in (ranked if beam is None else ranked[:beam])}

    def prefix(layer: int, entry: tuple) -> list[RouteStep]:
        """Steps from the top layer down to ``entry`` at ``layer``, from the back pointers above it."""
        steps = []
        while True:
            _, node, block, weight = entry[:4]
            steps.append(_step(patterns[layer], batch, layer, node, block, weight, needle_set))
            if layer == n_layers - 1:
                break
            layer += 1
            entry = back[layer][node]
        return list(reversed(steps))

    def continuation(layer: int, node: int) -> list[RouteStep]:
        """The exact best steps from node (layer, node) down to the input."""
        steps = []
        for lower in reversed(range(layer + 1)):
            block = int(down_blocks[lower][node])
            if block < 0:
                break
            steps.append(_step(patterns[lower], batch, lower, node, block, float(down_weights[lower][node]), needle_set))
            node = node_of(block)
        return steps

    paths = tuple(sorted((RoutePath(tuple(prefix(0, back[0][node])), back[0][node][0]) for node in frontier),
                         key=lambda path: -path.log_score))
    entries = []
    for layer, (full, prefix_score, node, block, weight) in needle_best.items():
        steps = prefix(layer, (prefix_score, node, block, weight))
        steps += continuation(layer - 1, node_of(block)) if layer > 0 else []
        entries.append(RoutePath(tuple(steps), full, entry_layer=layer))
    entries = tuple(sorted(entries, key=lambda path: -path.log_score))
    return Route(
        paths=paths, needle_entries=entries, edges=tuple(edges), needle_span=tuple(needle_span),
        needle_blocks=needle_blocks, answer_position=position, answer_block=answer_block, n_layers=n_layers,
        n_heads=first.block_indices.shape[1], n_query_blocks=num_blocks(seq_len, qb), query_block=qb, key_block=kb,
        beam=beam, head_reduce=head_reduce, skip_sink_blocks=skip_sink_blocks,
    )
