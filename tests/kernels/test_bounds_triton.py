"""The Triton bounds search against its torch reference (``search.bounds_estimate``; CPU: the Triton
interpreter, see conftest), and its wiring into ``rescored`` / ``bounds`` on the Triton backend.

Inputs are drawn afresh on every run; a failure prints its seed, and ``SPARSE_LENS_SEED=<seed>``
replays it. The kernel (``q+ . kmax + q- . kmin``) and the reference (``q . centre + |q| . radius``)
sum in different orders, so two halves whose bounds are within float noise may be ranked
differently: rows whose reference search met such a near-tie at the top-k boundary (recorded by
wrapping the reference's range scorer) are held to the structural invariants only; every other row
must be identical.
"""

from __future__ import annotations

import pytest
import torch

from sparse_lens.errors import BlockSizeError, InvalidConfigError, ShapeError
from sparse_lens.kernels import bounds_triton, search
from sparse_lens.kernels.blocks import BlockGeometry, num_blocks, visible_key_blocks
from sparse_lens.kernels.bounds_triton import bounds_estimate_triton
from sparse_lens.kernels.estimate import estimate_blocks
from sparse_lens.kernels.rescore_triton import rescore_top_k_triton
from tests.kernels.estimator_cases import DEVICE, check_rows, seed  # noqa: F401 (seed: the shared fixture)
from tests.kernels.estimator_cases import device_qk as random_qk

NEAR_TIE = 1e-4  # bound gap under which the two implementations may legitimately disagree



def reference_with_near_ties(query, key, monkeypatch, **settings):
    """The reference's output on fp32 copies of q / k, and which rows met a near-tie at the top-k
    boundary in any round."""
    batch, q_heads, seq, _ = query.shape
    n_search = settings["top_k"] - settings.get("sink_blocks", 0) - settings.get("local_blocks", 0)
    near_tie = torch.zeros(batch, q_heads, num_blocks(seq, settings["query_block"]), dtype=torch.bool)
    original = search.bounds_range_scorer

    def recording_scorer(*args, **kwargs):
        score_ranges = original(*args, **kwargs)

        def score(query_blocks, block_ids, cand_start, cand_end):
            scores = score_ranges(query_blocks, block_ids, cand_start, cand_end)
            best = scores.topk(min(n_search + 1, scores.shape[-1]), dim=-1).values
            if best.shape[-1] > n_search:
                gap = best[..., n_search - 1] - best[..., n_search]
                near_tie[:, :, block_ids.cpu()] |= ~(gap > NEAR_TIE).cpu()  # -inf vs -inf gives NaN: a tie
            return scores

        return score

    with monkeypatch.context() as patch:
        patch.setattr(search, "bounds_range_scorer", recording_scorer)
        expected = search.bounds_estimate(query.float(), key.float(), **settings)
    return expected, near_tie


def check(chosen, seq, settings):
    check_rows(chosen.cpu(), seq, settings["query_block"], settings["key_block"], settings["top_k"],
               settings.get("sink_blocks", 0), settings.get("local_blocks", 0),
               lambda n_visible, used: len(used) == min(n_visible, settings["top_k"]))


# (seq, query_block, key_block, top_k, sink, local, query_stride, batch, q_heads, kv_heads, dtype, head_major)
CASES = {
    "gqa-batch-2-fp32": (200, 16, 16, 5, 1, 1, 1, 2, 4, 2, torch.float32, True),
    "partial-last-block-bf16": (237, 16, 16, 6, 1, 2, 1, 1, 4, 2, torch.bfloat16, True),
    "query-16-key-32-stride-4": (237, 16, 32, 4, 1, 1, 4, 1, 2, 1, torch.float32, True),
    "query-32-key-16-stride-3-fp16": (250, 32, 16, 6, 0, 2, 3, 1, 2, 2, torch.float16, True),
    "no-sink-no-local": (190, 16, 16, 4, 0, 0, 1, 1, 4, 1, torch.float32, True),
    "sink-only-strided-views": (300, 16, 16, 6, 2, 0, 2, 1, 2, 1, torch.float32, False),
    "one-searched-branch": (161, 16, 16, 3, 1, 1, 1, 2, 2, 2, torch.bfloat16, False),
    "nothing-searched": (160, 16, 16, 3, 1, 2, 1, 1, 2, 1, torch.float32, True),
    "wide-search-head-dim-24": (560, 16, 16, 20, 1, 1, 4, 1, 1, 1, torch.float32, True),  # 18 branches, pad 32
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_the_reference(case, seed, monkeypatch):
    seq, query_block, key_block, top_k, sink, local, stride, batch, q_heads, kv_heads, dtype, head_major = case
    d = 24 if top_k == 20 else 16
    query, key = random_qk(seed, batch=batch, q_heads=q_heads, kv_heads=kv_heads, seq=seq, d=d, dtype=dtype,
                           head_major=head_major)
    settings = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink,
                    local_blocks=local, query_stride=stride)
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed})"

    chosen = bounds_estimate_triton(query, key, **settings)
    expected, near_tie = reference_with_near_ties(query, key, monkeypatch, **settings)

    assert chosen.shape == expected.shape and chosen.dtype == torch.int64, message
    check(chosen, seq, settings)
    differs = (chosen.cpu() != expected.cpu()).any(-1)
    assert not (differs & ~near_tie).any(), f"{message}: rows {(differs & ~near_tie).nonzero().tolist()} differ"
    assert near_tie.float().mean() < 0.05, f"{message}: {int(near_tie.sum())} near-tie rows, too many to be noise"


def block_bounds(query, key, query_block, key_block):
    """Quest's bound of every single key block for every query block (all queries), brute force."""
    batch, q_heads, seq, _ = query.shape
    group = q_heads // key.shape[1]
    n_qb, n_kb = num_blocks(seq, query_block), num_blocks(seq, key_block)
    bounds = torch.full((batch, q_heads, n_qb, n_kb), float("-inf"), dtype=torch.float64)
    for kb in range(n_kb):
        keys = key[:, :, kb * key_block: (kb + 1) * key_block].double()
        low, high = keys.amin(2).repeat_interleave(group, 1), keys.amax(2).repeat_interleave(group, 1)
        for qb in range(n_qb):
            queries = query[:, :, qb * query_block: (qb + 1) * query_block].double()
            per_query = torch.maximum(queries * high[:, :, None], queries * low[:, :, None]).sum(-1)
            bounds[:, :, qb, kb] = per_query.amax(-1)
    return bounds


def test_exact_ties_keep_equally_good_blocks(seed):
    # Integer q / k: bounds in a few integers, exact ties everywhere, broken in torch.topk's own order
    # by the reference. With a searched range of at most 2 * n_search blocks the first round scores
    # every block, so both must keep n_search blocks of the same bounds.
    query_block = key_block = 16
    top_k, sink, local = 6, 1, 1
    seq = (sink + local + 2 * (top_k - sink - local)) * key_block - 5
    generator = torch.Generator().manual_seed(seed)
    query = torch.randint(-1, 2, (1, 2, seq, 16), generator=generator).float().to(DEVICE)
    key = torch.randint(-1, 2, (1, 1, seq, 16), generator=generator).float().to(DEVICE)
    settings = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink, local_blocks=local)
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed})"

    chosen = bounds_estimate_triton(query, key, **settings).cpu()
    expected = search.bounds_estimate(query, key, **settings).cpu()
    check(chosen, seq, settings)
    bounds = block_bounds(query.cpu(), key.cpu(), query_block, key_block)
    searched = slice(sink, top_k - local)
    chosen_bounds = bounds.gather(-1, chosen[..., searched].clamp(min=0)).sort(-1).values
    expected_bounds = bounds.gather(-1, expected[..., searched].clamp(min=0)).sort(-1).values
    searched_rows = visible_key_blocks(seq, query_block, key_block) > top_k
    assert searched_rows.any()
    assert torch.equal(chosen_bounds[:, :, searched_rows], expected_bounds[:, :, searched_rows]), message
    assert torch.equal(chosen[:, :, ~searched_rows], expected[:, :, ~searched_rows]), message


def exact_block_masses(query, key, key_block):
    """Brute-force oracle: the causal softmax mass (scale 1/sqrt(d)) of every key block for every
    query, ``[batch, q_head, seq, n_key_blocks]`` in float64."""
    seq, d_head = query.shape[2], query.shape[3]
    group = query.shape[1] // key.shape[1]
    logits = query.double() @ key.double().repeat_interleave(group, 1).transpose(-1, -2) / d_head ** 0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return probs.unflatten(-1, (num_blocks(seq, key_block), key_block)).sum(-1)


def plant_a_dominant_key(query, key, position):
    """Make ``key[:, :, position]`` the largest ``q . k`` of every query, by construction.

    Dimension 0 is reserved: every query gets ``+1`` there, every other key ``0``, and the planted
    key ``margin`` (its other dimensions ``0``), so ``q . planted = margin`` for every query. Any
    range of key blocks without the planted key then has, for every query, the Quest bound
    ``sum_(d>=1) max(q_d kmax_d, q_d kmin_d) <= sum_(d>=1) |q_d| max_keys |k_d| < margin / 2``,
    while a range with it bounds at least ``margin``: every searched range holding the planted
    key outranks every range without it, whatever the seed."""
    query, key = query.clone(), key.clone()
    query[..., 0] = 1
    key[..., 0] = 0
    largest_rest = (query[..., 1:].abs().double() @ key[..., 1:].abs().amax(2).double().transpose(-1, -2)).max()
    margin = 2 * float(largest_rest) + 1
    key[:, :, position] = 0
    key[:, :, position, 0] = margin
    return query, key


@pytest.mark.parametrize("offset", [0, 11, 15])
def test_a_large_key_anywhere_in_a_block_is_found(offset, seed):
    # The bound reads every key of a range (through the table), not a sample: one key dominating
    # every q . k, at any offset of block 5, must make block 5 the exact top block of every query
    # block searching it, and the search must find it there.
    query_block = key_block = 16
    planted_block = 5
    query, key = random_qk(seed, q_heads=2, kv_heads=1, seq=256)
    query, key = plant_a_dominant_key(query, key, planted_block * key_block + offset)
    settings = dict(query_block=query_block, key_block=key_block, top_k=4, sink_blocks=1, local_blocks=1)
    n_visible = visible_key_blocks(256, query_block, key_block)
    rows = (n_visible > settings["top_k"]) & (n_visible - settings["local_blocks"] > planted_block)
    assert rows.sum() == 10  # query blocks 6..15 search a range holding block 5
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed}), offset={offset}"

    # The premise, against the exact oracle: block 5 holds the largest mass of every query there.
    mass = exact_block_masses(query.cpu(), key.cpu(), key_block)
    queries_there = torch.arange(256) >= int(rows.nonzero()[0]) * query_block
    assert (mass[:, :, queries_there].argmax(-1) == planted_block).all(), message

    chosen = bounds_estimate_triton(query, key, **settings).cpu()
    assert (chosen[:, :, rows] == planted_block).any(-1).all(), f"{message}: {chosen[0, 0].tolist()}"


@pytest.mark.parametrize("seq,top_k", [(150, 4), (40, 6)], ids=["searched-rows", "keep-all-rows-only"])
def test_writes_every_element_of_the_output(seq, top_k, seed):
    query, key = random_qk(seed, q_heads=2, kv_heads=1, seq=seq)
    settings = dict(query_block=16, key_block=16, top_k=top_k, sink_blocks=1, local_blocks=1)
    poison = -7
    block_indices = torch.full((1, 2, num_blocks(seq, 16), top_k), poison, dtype=torch.int64, device=DEVICE)
    bounds_triton._launch(query, key, block_indices, BlockGeometry(**settings), 1)
    assert not (block_indices == poison).any(), f"seed={seed}: unwritten elements"
    check(block_indices, seq, settings)


@pytest.mark.parametrize("query_block,key_block", [(24, 24), (16, 48), (8, 16), (16, 8)])
def test_rejects_block_sizes_the_kernel_cannot_tile(query_block, key_block):
    query, key = random_qk(0, seq=64)
    with pytest.raises(BlockSizeError, match="power of two"):
        bounds_estimate_triton(query, key, query_block=query_block, key_block=key_block, top_k=4)


def test_rejects_bad_settings_and_shapes():
    query, key = random_qk(0, seq=64)
    with pytest.raises(InvalidConfigError):
        bounds_estimate_triton(query, key, query_block=16, key_block=16, top_k=2, sink_blocks=2, local_blocks=1)
    for stride in (0, 17, 2.0):
        with pytest.raises(InvalidConfigError, match="query_stride"):
            bounds_estimate_triton(query, key, query_block=16, key_block=16, top_k=4, query_stride=stride)
    with pytest.raises(ShapeError):
        bounds_estimate_triton(query[:, :3], key, query_block=16, key_block=16, top_k=4)
    with pytest.raises(ShapeError):
        bounds_estimate_triton(query, key.double(), query_block=16, key_block=16, top_k=4)


# ----- wiring: the "bounds" and "rescored" estimators on the Triton backend --------------------
def test_the_triton_backend_runs_the_kernel_for_bounds_searches(seed, monkeypatch):
    query, key = random_qk(seed, q_heads=2, kv_heads=1, seq=190)  # 12 key blocks: the wide search searches too
    budget = dict(query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1)
    calls = []
    kernel = bounds_triton.bounds_estimate_triton_unchecked
    monkeypatch.setattr(bounds_triton, "bounds_estimate_triton_unchecked",
                        lambda *args, **kwargs: calls.append(args[2]) or kernel(*args, **kwargs))

    # "rescored" with the bounds search: the kernel's candidates (beam x the searched slots), then the
    # fused rescoring with rescore_query_stride.
    chosen = estimate_blocks(query, key, estimator="rescored", beam=2, rescore_search="bounds",
                             rescore_query_stride=4, backend="triton", **budget)
    wide = BlockGeometry(**{**budget, "top_k": 2 + 2 * 3})
    assert calls == [wide]
    candidates = kernel(query, key, wide)
    expected = rescore_top_k_triton(query, key, candidates, query_stride=4, **budget)
    assert torch.equal(chosen, expected), f"seed={seed}"

    assert torch.equal(estimate_blocks(query, key, estimator="bounds", backend="triton", **budget),
                       kernel(query, key, BlockGeometry(**budget)))
    assert len(calls) == 2
    estimate_blocks(query, key, estimator="rescored", rescore_search="bounds", backend="reference", **budget)
    assert len(calls) == 2, "the reference backend must not run the kernel"
