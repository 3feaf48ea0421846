"""Needle routes: a hand-built graph with a known heaviest path, brute force on a tiny model, and
the real default model on a RULER needle prompt."""

from __future__ import annotations

import math

import pytest
import torch

import sparse_lens as sl
from sparse_lens.analysis.needle import needle_recall
from sparse_lens.analysis.routes import needle_key_blocks, route_to_needle
from sparse_lens.data import needle_prompt
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
    needle at layer 1); greedy (beam 1) takes 7 -> 7 -> 6 -> 6 = 0.21 * 0.26 * 0.5 = 0.0273.
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


def brute_force_routes(patterns, answer_block, needle_blocks, skip_sink_blocks=1, reduce="mean"):
    """Every path from the answer block at the top layer to the input (exhaustive): the best one, and
    per layer the best one whose first needle-reading step is at that layer."""
    n_layers = len(patterns)

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
            walk(layer - 1, block, log_score + math.log(weight), steps + [(layer, node, block)])

    walk(n_layers - 1, answer_block, 0.0, [])
    return best, entries


def as_triples(path):
    return [(step.layer, step.query_block, step.key_block) for step in path.steps]


def test_hand_built_route_is_the_known_heaviest_path(tmp_path):
    patterns = hand_built_patterns()
    exact = route_to_needle(patterns, NEEDLE, answer_position=-1, beam=None)
    assert as_triples(exact.best) == [(2, 7, 5), (1, 5, 2), (0, 2, 2)]
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

    assert as_triples(route_to_needle(patterns, NEEDLE, beam=1).best) == [(2, 7, 7), (1, 7, 6), (0, 6, 6)]
    assert route_to_needle(patterns, NEEDLE, beam=1).best.score == pytest.approx(0.21 * 0.26 * 0.5)
    assert as_triples(route_to_needle(patterns, NEEDLE, beam=2).best) != as_triples(exact.best)  # 5 falls off
    assert as_triples(route_to_needle(patterns, NEEDLE, beam=3).best) == as_triples(exact.best)
    # the sink is followed only when asked: then 7 -> 0 -> 0 -> 0 carries 0.45
    with_sink = route_to_needle(patterns, NEEDLE, beam=None, skip_sink_blocks=0)
    assert as_triples(with_sink.best) == [(2, 7, 0), (1, 0, 0), (0, 0, 0)]

    best, entries = brute_force_routes(patterns, 7, {2})
    assert best[0] == pytest.approx(exact.best.log_score)
    assert {layer: value[0] for layer, value in entries.items()} == pytest.approx(
        {path.entry_layer: path.log_score for path in exact.needle_entries})
    summary = exact.summary()
    assert "enters the best path at layer 1" in summary and "L1: 5 -> 2" in summary
    assert plot_route(exact, tmp_path / "route.png").stat().st_size > 0


@pytest.mark.parametrize("head_reduce", ["mean", "max", "sum"])
def test_exact_route_matches_brute_force_on_a_tiny_model(head_reduce):
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4)
    sparse, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), stream)
    tokens = torch.randint(0, 90, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = sparse.run_with_cache(tokens)
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(3)]
    needle = (70, 90)  # key blocks 4 and 5
    route = route_to_needle(patterns, needle, beam=None, head_reduce=head_reduce)
    best, entries = brute_force_routes(patterns, 9, set(needle_key_blocks(needle, 16)), reduce=head_reduce)
    assert route.best.log_score == pytest.approx(best[0])
    assert as_triples(route.best) == best[1]
    # Entries below the top layer follow each node's best path (Viterbi), which the brute force
    # matches on this graph whenever that path has not read the needle yet.
    got = {path.entry_layer: path.log_score for path in route.needle_entries}
    assert got[2] == pytest.approx(entries[2][0])
    for layer, score in got.items():
        assert score <= entries[layer][0] + 1e-9
    for path in route.needle_entries:
        assert path.needle_entry.layer == path.entry_layer and path.needle_entry.needle
        assert not any(step.needle for step in path.steps if step.layer > path.entry_layer)
        assert path.log_score == pytest.approx(sum(math.log(step.mass) for step in path.steps))


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
    route = route_to_needle(patterns, span, answer_position=-1, beam=4)
    summary = route.summary()
    print(summary)
    record_property("needle_route", summary)
    n_layers, n_heads = len(patterns), patterns[0].block_indices.shape[1]
    assert patterns[0].pruned_fraction() > 0.5
    assert route.answer_block == (sample.length - 1) // 32 and route.needle_blocks == needle_key_blocks(span, 32)
    assert 1 <= len(route.paths) <= 4 and len(route.edges) <= n_layers * 4 * n_heads * 8

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
        assert path.log_score == pytest.approx(sum(math.log(step.mass) for step in path.steps), rel=1e-6)

    for path in route.paths:
        check(path)
    assert route.best.log_score == max(path.log_score for path in route.paths)
    # The needle's entry layers are reported, each with a complete route through it.
    recall = needle_recall(patterns, span)
    assert route.needle_entries and set(route.entry_layers()) <= set(range(n_layers))
    for path in route.needle_entries:
        check(path)
        assert path.needle_entry.needle and path.needle_entry.heads
    if recall.kept[-1].any():  # the answer block keeps a needle block at the last layer: a direct entry
        assert n_layers - 1 in route.entry_layers()
    assert "Needle tokens" in summary and f"L{route.entry_layers()[0]}:" in summary
    assert plot_route(route, tmp_path / "route.png").stat().st_size > 0
