"""Needle routes: exact against a brute-force enumeration of every path (hand-built graph with a
known heaviest path, random tiny patterns, a tiny model), the best path never below a needle route,
no [blocks, blocks] tensor, and the real default model on a RULER needle prompt."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparse_lens as sl
from sparse_lens.analysis.needle import needle_recall
from sparse_lens.analysis.routes import RouteStep, needle_key_blocks, route_to_needle
from sparse_lens.data import needle_prompt
from sparse_lens.errors import InvalidConfigError, InvalidPositionsError, InvalidSpanError, PatternGeometryError
from sparse_lens.plots import plot_route
from tests.conftest import sparse_and_dense, tiny_llama_config

BLOCK, N_BLOCKS, TOP_K, HEADS = 4, 8, 3, 2
NEEDLE = (8, 12)  # key block 2


def hand_built_patterns() -> list[sl.BlockSparsePattern]:
    """3 layers, 2 heads, 8 blocks of 4 tokens. Every row keeps [sink, previous, itself] with mass
    [0.2, 0.3, 0.5] unless overridden below, where the known routes live (mean over heads):

    layer 2, block 7: 5 (0.15), 3 (0.19), 7 (0.21), sink (0.45)
    layer 1, block 5: 2 (0.65), 5 (0.15); block 3: 1 (0.25), 3 (0.35); block 7: 6 (0.26), 7 (0.24)
    layer 0: the default rows (itself 0.5, previous 0.3)

    Heaviest path from block 7: 7 -> 5 -> 2 -> 2, score 0.15 * 0.65 * 0.5 = 0.04875 (it enters the
    needle at layer 1); a greedy walk (heaviest edge first) takes 7 -> 7 -> 6 -> 6 = 0.21 * 0.26 * 0.5
    = 0.0273, and a beam of 2 drops block 5 at layer 2.
    """
    layers = []
    for layer in range(3):
        indices = torch.full((1, HEADS, N_BLOCKS, TOP_K), -1, dtype=torch.int64)
        mass = torch.zeros(1, HEADS, N_BLOCKS, TOP_K)
        for row in range(N_BLOCKS):
            kept = sorted({0, max(row - 1, 0), row})
            weights = {0: [1.0], 1: [0.5, 0.5]}.get(row, [0.2, 0.3, 0.5])
            indices[0, :, row, :len(kept)] = torch.tensor(kept)
            mass[0, :, row, :len(kept)] = torch.tensor(weights)
        overrides = {
            2: {7: ([[0, 5, 7], [0, 3, 7]], [[0.5, 0.3, 0.2], [0.4, 0.38, 0.22]])},
            1: {5: ([[0, 2, 5], [0, 2, 5]], [[0.2, 0.7, 0.1], [0.2, 0.6, 0.2]]),
                3: ([[0, 1, 3], [0, 1, 3]], [[0.3, 0.3, 0.4], [0.5, 0.2, 0.3]]),
                7: ([[0, 6, 7], [0, 6, 7]], [[0.5, 0.2, 0.3], [0.5, 0.32, 0.18]])},
        }
        for row, (rows_indices, rows_mass) in overrides.get(layer, {}).items():
            indices[0, :, row] = torch.tensor(rows_indices)
            mass[0, :, row] = torch.tensor(rows_mass)
        layers.append(sl.BlockSparsePattern(indices, mass, torch.zeros(1, HEADS, BLOCK * N_BLOCKS),
                                            BLOCK * N_BLOCKS, BLOCK, BLOCK, 1.0))
    return layers


def random_patterns(seed: int, n_layers: int = 4, n_query_blocks: int = 7, query_block: int = 4,
                    key_block: int = 4, heads: int = 2, top_k: int = 3) -> list[sl.BlockSparsePattern]:
    """Random causal kept sets (ascending, -1 padded) with random masses, some of them 0."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = n_query_blocks * query_block
    layers = []
    for _ in range(n_layers):
        indices = torch.full((1, heads, n_query_blocks, top_k), -1, dtype=torch.int64)
        mass = torch.zeros(1, heads, n_query_blocks, top_k)
        for head in range(heads):
            for row in range(n_query_blocks):
                visible = ((row + 1) * query_block - 1) // key_block + 1
                kept = torch.randperm(visible, generator=generator)[:top_k].sort().values
                kept_mass = torch.rand(len(kept), generator=generator) > 0.1  # some zero masses
                weights = torch.rand(len(kept), generator=generator) * kept_mass
                indices[0, head, row, :len(kept)] = kept
                mass[0, head, row, :len(kept)] = weights / weights.sum().clamp(min=1e-6)
        layers.append(sl.BlockSparsePattern(indices, mass, torch.zeros(1, heads, seq_len), seq_len, query_block,
                                            key_block, 1.0))
    return layers


def brute_force_routes(patterns, answer_block, needle_blocks, skip_sink_blocks=1, reduce="mean"):
    """Every path from the answer block at the top layer to the input (exhaustive): the best one, and
    per layer the best one whose first needle-reading step (from the top) is at that layer."""
    n_layers = len(patterns)
    qb, kb = patterns[0].query_block, patterns[0].key_block

    def edges(layer, node):
        indices, mass = patterns[layer].block_indices[0, :, node], patterns[layer].block_mass[0, :, node]
        weights = {}
        for head in range(indices.shape[0]):
            for slot in range(indices.shape[1]):
                block = int(indices[head, slot])
                if block < 0:
                    continue
                value = float(mass[head, slot])
                if reduce == "max":
                    weights[block] = max(weights.get(block, 0.0), value)
                else:
                    weights[block] = weights.get(block, 0.0) + value / (indices.shape[0] if reduce == "mean" else 1)
        return {b: w for b, w in weights.items() if w > 0 and (b >= skip_sink_blocks or b in needle_blocks)}

    best, entries = (-math.inf, None), {}

    def walk(layer, node, log_score, steps):
        nonlocal best
        if layer < 0:
            if log_score > best[0]:
                best = (log_score, steps)
            first = next((s for s in steps if s[2] in needle_blocks), None)
            if first is not None and log_score > entries.get(first[0], (-math.inf,))[0]:
                entries[first[0]] = (log_score, steps)
            return
        for block, weight in edges(layer, node).items():
            walk(layer - 1, block * kb // qb, log_score + math.log(weight), steps + [(layer, node, block)])

    walk(n_layers - 1, answer_block, 0.0, [])
    return best, entries


def as_triples(path):
    return [(step.layer, step.query_block, step.key_block) for step in path.steps]


def assert_matches_brute_force(route, patterns, needle, answer_block, **options):
    best, entries = brute_force_routes(patterns, answer_block, set(needle_key_blocks(needle, patterns[0].key_block)),
                                       **options)
    if best[1] is None:
        assert route.best is None and not route.needle_entries
        return
    assert route.best.log_score == pytest.approx(best[0], abs=1e-9)
    assert as_triples(route.best) == best[1]
    assert {path.entry_layer: path.log_score for path in route.needle_entries} == pytest.approx(
        {layer: value[0] for layer, value in entries.items()}, abs=1e-9)
    for path in route.needle_entries:
        assert as_triples(path) == entries[path.entry_layer][1]
        assert path.needle_entry.needle and not any(step.needle for step in path.steps if step.layer > path.entry_layer)
        # the best path is never below a route through the needle
        assert route.best.log_score >= path.log_score
    assert [path.log_score for path in route.needle_entries] == sorted(
        (path.log_score for path in route.needle_entries), reverse=True)


def test_hand_built_route_is_the_known_heaviest_path(tmp_path):
    patterns = hand_built_patterns()
    exact = route_to_needle(patterns, NEEDLE, answer_position=-1)
    assert as_triples(exact.best) == [(2, 7, 5), (1, 5, 2), (0, 2, 2)]
    assert exact.best.log_score == pytest.approx(math.log(0.15 * 0.65 * 0.5))
    assert exact.best.score == pytest.approx(0.15 * 0.65 * 0.5)
    assert [step.mass for step in exact.best.steps] == pytest.approx([0.15, 0.65, 0.5])
    entry = exact.best.needle_entry
    assert (entry.layer, entry.query_block, entry.key_block) == (1, 5, 2)
    assert [head for head, _ in entry.heads] == [0, 1]
    assert [mass for _, mass in entry.heads] == pytest.approx([0.7, 0.6])
    assert exact.needle_blocks == (2,) and exact.answer_block == 7
    # the needle can also be entered first at layer 0, from block 3 (7 -> 3 -> 3 -> 2)
    assert exact.entry_layers() == [1, 0]
    assert as_triples(exact.needle_entries[1]) == [(2, 7, 3), (1, 3, 3), (0, 3, 2)]
    assert exact.needle_entries[1].score == pytest.approx(0.19 * 0.35 * 0.3)
    # the best path enters the needle: it is the best needle route, with the same log-mass exactly
    assert exact.best_entry.steps == exact.best.steps and exact.best_entry.log_score == exact.best.log_score
    # the sink is followed only when asked: then 7 -> 0 -> 0 -> 0 carries 0.45
    with_sink = route_to_needle(patterns, NEEDLE, skip_sink_blocks=0)
    assert as_triples(with_sink.best) == [(2, 7, 0), (1, 0, 0), (0, 0, 0)]
    assert_matches_brute_force(with_sink, patterns, NEEDLE, 7, skip_sink_blocks=0)
    assert_matches_brute_force(exact, patterns, NEEDLE, 7)
    # the former beam width is deprecated and ignored
    with pytest.warns(DeprecationWarning):
        beamed = route_to_needle(patterns, NEEDLE, beam=1)
    assert as_triples(beamed.best) == as_triples(exact.best)
    # the edges kept for plots are those on the best routes, the best path's among them
    assert {(layer, q, b) for layer, q, b, _ in exact.edges} >= set(as_triples(exact.best))
    few = route_to_needle(patterns, NEEDLE, max_edges=3)
    assert {(layer, q, b) for layer, q, b, _ in few.edges} == set(as_triples(exact.best))
    summary = exact.summary()
    assert "enters the best path at layer 1" in summary and "L1: 5 -> 2" in summary and "log-mass" in summary
    assert plot_route(exact, tmp_path / "route.png").stat().st_size > 0


@pytest.mark.parametrize("head_reduce", ["mean", "max", "sum"])
@pytest.mark.parametrize("blocks", [(4, 4), (8, 4), (4, 8)])
def test_exact_route_matches_brute_force_on_random_patterns(head_reduce, blocks):
    query_block, key_block = blocks
    for seed in range(12):
        patterns = random_patterns(seed, n_query_blocks=7 if query_block <= key_block else 5,
                                   query_block=query_block, key_block=key_block)
        seq_len = patterns[0].seq_len
        needle = (seq_len // 3, seq_len // 3 + 5)
        answer = seq_len - 1 - seed % 3
        route = route_to_needle(patterns, needle, answer_position=answer, head_reduce=head_reduce)
        assert_matches_brute_force(route, patterns, needle, answer // query_block, reduce=head_reduce)
        # a needle in the sink block is followed even though the sink is skipped
        sink_needle = (0, 3)
        route = route_to_needle(patterns, sink_needle, head_reduce=head_reduce)
        assert_matches_brute_force(route, patterns, sink_needle, (seq_len - 1) // query_block, reduce=head_reduce)


def test_exact_route_matches_brute_force_on_a_tiny_model():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4)
    sparse, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), stream)
    tokens = torch.randint(0, 90, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = sparse.run_with_cache(tokens)
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(3)]
    needle = (70, 90)  # key blocks 4 and 5
    route = route_to_needle(patterns, needle)
    assert route.needle_entries
    assert_matches_brute_force(route, patterns, needle, 9)
    for path in route.needle_entries:
        assert path.log_score == pytest.approx(sum(math.log(step.mass) for step in path.steps))


class LargestTensor(TorchDispatchMode):
    """Records the element count, shape and op of the largest tensor any op creates."""

    largest = (0, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest[0]:
                self.largest = (tensor.numel(), tuple(tensor.shape), str(func))
        return out


def test_route_builds_no_block_by_block_tensor():
    n_blocks = 1024
    patterns = random_patterns(0, n_layers=2, n_query_blocks=n_blocks, query_block=1, key_block=1, heads=2, top_k=4)
    with LargestTensor() as recorder:
        route = route_to_needle(patterns, (n_blocks // 2, n_blocks // 2 + 3))
    assert route.best is not None
    numel, shape, op = recorder.largest
    assert numel < 64 * n_blocks, f"{op} created a tensor of shape {shape}"


def test_no_path_when_a_layer_keeps_only_the_sink():
    patterns = hand_built_patterns()
    only_sink = patterns[0].block_indices.clone()
    only_sink[..., 1:] = -1  # every row of layer 0 keeps block 0 only, which is skipped
    patterns[0] = patterns[0].with_block_indices(only_sink)
    route = route_to_needle(patterns, NEEDLE)
    assert route.best is None and not route.needle_entries and not route.edges
    assert "No path reaches the input" in route.summary()
    # with the sink followed, every path ends on it
    route = route_to_needle(patterns, NEEDLE, skip_sink_blocks=0)
    assert route.best.steps[-1].key_block == 0
    assert_matches_brute_force(route, patterns, NEEDLE, 7, skip_sink_blocks=0)


def test_bad_input_gets_named_errors():
    patterns = hand_built_patterns()
    with pytest.raises(InvalidSpanError):
        route_to_needle(patterns, (30, 40))  # past the 32 tokens
    with pytest.raises(InvalidSpanError):
        route_to_needle(patterns, (8, 8))  # empty
    with pytest.raises(InvalidPositionsError):
        route_to_needle(patterns, NEEDLE, answer_position=32)
    with pytest.raises(PatternGeometryError):
        route_to_needle([patterns[0][:, :, 8:], *patterns[1:]], NEEDLE)  # sliced along queries
    with pytest.raises(PatternGeometryError):
        route_to_needle([patterns[0], random_patterns(0, n_layers=1, n_query_blocks=6)[0]], NEEDLE)
    with pytest.raises(PatternGeometryError):
        route_to_needle([], NEEDLE)
    with pytest.raises(InvalidConfigError):
        route_to_needle(patterns, NEEDLE, head_reduce="median")


def test_the_batch_row_asked_for_is_the_one_read():
    """A batch of two different rows: each row's route (steps, masses and heads) is that row's alone."""
    hand, other = hand_built_patterns(), random_patterns(1, n_layers=3, n_query_blocks=N_BLOCKS)
    batched = [sl.BlockSparsePattern(torch.cat([o.block_indices, h.block_indices]),
                                     torch.cat([o.block_mass, h.block_mass]), torch.zeros(2, HEADS, BLOCK * N_BLOCKS),
                                     BLOCK * N_BLOCKS, BLOCK, BLOCK, 1.0) for h, o in zip(hand, other)]
    for row, alone in ((1, hand), (0, other)):
        route, expected = route_to_needle(batched, NEEDLE, batch=row), route_to_needle(alone, NEEDLE)
        assert route.best == expected.best and route.needle_entries == expected.needle_entries
    assert route_to_needle(batched, NEEDLE, batch=1).best != route_to_needle(batched, NEEDLE, batch=0).best


def test_a_needle_ending_on_the_last_token_is_routed():
    patterns = hand_built_patterns()  # 32 tokens
    route = route_to_needle(patterns, (28, 32))
    assert route.needle_blocks == (7,) and route.needle_entries
    assert_matches_brute_force(route, patterns, (28, 32), 7)


def test_summary_lines_and_needle_node_blocks():
    """The summary's difference to the best path is the entry's log-mass minus the best's (<= 0);
    a step names its heaviest heads and counts the rest; the needle's node blocks are query blocks."""
    route = route_to_needle(hand_built_patterns(), NEEDLE)
    second = route.needle_entries[1]
    assert second.log_score < route.best.log_score
    assert f"{second.log_score:.3f} ({second.log_score - route.best.log_score:+.3f})" in route.summary()
    step = RouteStep(0, 1, 2, 0.5, ((3, 0.3), (1, 0.1), (2, 0.08), (0, 0.02)), False)
    assert step.describe(max_heads=2) == "L0: 1 -> 2 (mass 0.500; H3 0.30, H1 0.10, +2)"
    wide = route_to_needle(random_patterns(0, n_query_blocks=5, query_block=8, key_block=4), NEEDLE)
    assert wide.needle_blocks == (2,) and wide.needle_node_blocks() == (1,)  # tokens 8..11: key block 2, query block 1


def test_patterns_without_a_batch_axis_are_a_batch_of_one():
    patterns = hand_built_patterns()
    batchless = [pattern[0] for pattern in patterns]  # what run_with_cache(remove_batch_dim=True) caches
    assert not batchless[0].has_batch_dim
    route, expected = route_to_needle(batchless, NEEDLE), route_to_needle(patterns, NEEDLE)
    assert route.best == expected.best and route.needle_entries == expected.needle_entries
    recall, expected_recall = needle_recall(batchless, NEEDLE), needle_recall(patterns, NEEDLE)
    assert torch.equal(recall.kept, expected_recall.kept) and torch.equal(recall.mass, expected_recall.mass)


def test_needle_recall_checks_its_span():
    patterns = hand_built_patterns()  # 32 tokens
    assert needle_recall(patterns, NEEDLE).needle_blocks == (2,)
    for span in [(40, 50), (8, 40), (8, 8), (12, 8), (-4, 4)]:  # past the end, cut, empty, reversed, negative
        with pytest.raises(InvalidSpanError):
            needle_recall(patterns, span)


@pytest.fixture(scope="module")
def needle_trace(smollm2):
    sample = needle_prompt(smollm2.tokenizer, 1024, depth=0.5, seed=0)
    tokens = torch.tensor([sample.input_ids])
    with torch.no_grad(), smollm2.stream_settings(query_block=32, key_block=32, top_k=8, mode="sparse", keep_qk=False):
        _, cache = smollm2.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(smollm2.cfg.n_layers)]
    return sample, patterns


def test_real_needle_route_is_reported(needle_trace, tmp_path, record_property):
    sample, patterns = needle_trace
    span = sample.needle_spans[0]
    route = route_to_needle(patterns, span, answer_position=-1)
    summary = route.summary()
    print(summary)
    record_property("needle_route", summary)
    n_layers, n_heads = len(patterns), patterns[0].block_indices.shape[1]
    assert patterns[0].pruned_fraction() > 0.5
    assert route.answer_block == (sample.length - 1) // 32 and route.needle_blocks == needle_key_blocks(span, 32)
    assert len(route.paths) == 1 and 0 < len(route.edges) <= 2000

    def check(path):
        assert [step.layer for step in path.steps] == list(reversed(range(n_layers)))
        assert path.steps[0].query_block == route.answer_block
        for upper, lower in zip(path.steps, path.steps[1:]):
            assert lower.query_block == upper.key_block  # equal query and key blocks: the edge lands there
        for step in path.steps:
            indices = patterns[step.layer].block_indices[0, :, step.query_block]
            mass = patterns[step.layer].block_mass[0, :, step.query_block]
            kept = indices == step.key_block
            assert step.mass == pytest.approx(float((mass * kept).sum()) / n_heads, rel=1e-5)
            assert sorted(h for h, _ in step.heads) == sorted(kept.any(-1).nonzero().flatten().tolist())
            assert step.needle == (step.key_block in route.needle_blocks)
            assert step.key_block >= 1 or step.needle  # the sink is not followed
        assert path.log_score == pytest.approx(sum(math.log(step.mass) for step in path.steps), rel=1e-9)

    check(route.best)
    # The needle's entry layers are reported, each with a complete route through it, none above the best.
    recall = needle_recall(patterns, span)
    assert route.needle_entries and set(route.entry_layers()) <= set(range(n_layers))
    for path in route.needle_entries:
        check(path)
        assert path.needle_entry.needle and path.needle_entry.heads
        assert path.log_score <= route.best.log_score
    if recall.kept[-1].any():  # the answer block keeps a needle block at the last layer: a direct entry
        assert n_layers - 1 in route.entry_layers()
    assert "Needle tokens" in summary and f"L{route.entry_layers()[0]}:" in summary
    assert plot_route(route, tmp_path / "route.png").stat().st_size > 0
