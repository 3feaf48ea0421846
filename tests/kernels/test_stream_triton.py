"""The Triton Stream estimator against the torch reference (CPU: Triton interpreter, see conftest).

Inputs are drawn afresh on every run; a failure prints its seed, and ``SPARSE_LENS_SEED=<seed>``
replays it. The kernel and the reference sum ``q . k`` in different orders, so two candidates
whose scores are within float noise may be ranked differently. Rows whose reference search met
such a near-tie (recorded by wrapping the reference's scoring function) are held to the
structural invariants only; every other row must be identical.
"""

from __future__ import annotations

import pytest
import torch

from sparse_lens.errors import BlockSizeError, InvalidConfigError, ShapeError
from sparse_lens.kernels import stream, stream_launch
from sparse_lens.kernels.blocks import num_blocks, pad_to_blocks, visible_key_blocks
from sparse_lens.kernels.stream import (
    expanded_branches,
    score_branches_by_center_block,
    stream_estimate,
)
from sparse_lens.kernels.stream_triton import (
    _stream_estimate_into,
    stream_estimate_triton,
)
from tests.kernels.estimator_cases import DEVICE, seed  # noqa: F401 (seed: the shared fixture)
from tests.kernels.estimator_cases import device_qk as random_qk

NEAR_TIE = 1e-4  # score gap under which the two implementations may legitimately disagree



def reference_with_near_ties(query, key, monkeypatch, **settings):
    """The reference's output, and which rows met a near-tie at the top-k boundary in any round."""
    batch, q_heads, seq, _ = query.shape
    n_search = expanded_branches(settings["top_k"] - settings.get("sink_blocks", 0) - settings.get("local_blocks", 0),
                                 settings.get("expand_levels", 0))
    near_tie = torch.zeros(batch, q_heads, num_blocks(seq, settings["query_block"]), dtype=torch.bool)
    original = stream.score_branches_by_center_block

    def recording(query_blocks, key_blocks, block_ids, cand_start, cand_end, **kwargs):
        score = original(query_blocks, key_blocks, block_ids, cand_start, cand_end, **kwargs)
        best = score.topk(n_search + 1, dim=-1).values
        gap = best[..., n_search - 1] - best[..., n_search]
        near_tie[:, :, block_ids.cpu()] |= ~(gap > NEAR_TIE).cpu()  # -inf vs -inf gives NaN: a tie
        return score

    with monkeypatch.context() as patch:
        patch.setattr(stream, "score_branches_by_center_block", recording)
        expected = stream_estimate(query, key, **settings)
    return expected, near_tie


def assert_rows_valid(block_indices, seq, settings, message):
    """Sorted, unique, causal, -1 only at the end, full, sinks and locals present."""
    top_k, sink, local = settings["top_k"], settings.get("sink_blocks", 0), settings.get("local_blocks", 0)
    visible = visible_key_blocks(seq, settings["query_block"], settings["key_block"]).tolist()
    for row_index, rows in enumerate(block_indices.cpu().permute(2, 0, 1, 3).reshape(len(visible), -1, top_k)):
        n_visible = visible[row_index]
        for row in rows.tolist():
            used = [block for block in row if block >= 0]
            assert used == sorted(set(used)) and all(block < n_visible for block in used), (row, message)
            assert len(used) == min(top_k, n_visible) and row[len(used):] == [-1] * (top_k - len(used)), (row, message)
            if n_visible > top_k:
                assert used[:sink] == list(range(sink)), (row, message)
                assert used[top_k - local:] == list(range(n_visible - local, n_visible)), (row, message)


def block_scores(query, key, query_block, key_block, representative_keys):
    """Every key block's representative score for every query block, by the reference's scorer."""
    batch, q_heads, seq, _ = query.shape
    n_query_blocks, n_key_blocks = num_blocks(seq, query_block), num_blocks(seq, key_block)
    query_blocks = pad_to_blocks(query.float(), query_block).unflatten(2, (n_query_blocks, query_block))
    key_blocks = pad_to_blocks(key.float(), key_block).unflatten(2, (n_key_blocks, key_block))
    start = torch.arange(n_key_blocks, device=query.device).expand(batch, q_heads, n_query_blocks, n_key_blocks)
    return score_branches_by_center_block(
        query_blocks, key_blocks, torch.arange(n_query_blocks, device=query.device), start, start + 1,
        seq_len=seq, query_block=query_block, key_block=key_block,
        representative_keys=min(representative_keys, key_block),
    )


# (seq, query_block, key_block, top_k, sink, local, representative_keys, batch, q_heads, kv_heads, dtype, head_major)
CASES = {
    "gqa-batch-2-fp32": (200, 16, 16, 5, 1, 1, 4, 2, 4, 2, torch.float32, True),
    "partial-last-block-bf16": (237, 16, 16, 6, 1, 2, 1, 1, 4, 2, torch.bfloat16, True),
    "query-16-key-32": (237, 16, 32, 4, 1, 1, 8, 1, 2, 1, torch.float32, True),
    "query-32-key-16-whole-block": (250, 32, 16, 6, 0, 2, 16, 1, 2, 2, torch.bfloat16, True),
    # 38 searched branches (CAND_PAD 128): keys x queries score tile and sorted selection, as
    # rescored's wide search; with and without the score mask
    "wide-key-major-sort": (800, 16, 16, 40, 1, 1, 2, 1, 2, 1, torch.float32, True),
    "wide-key-major-sort-masked": (760, 16, 16, 40, 1, 0, 2, 1, 2, 1, torch.bfloat16, True),
    # one 16-key local block under a 32-query block: searched keys can follow a query (masked scores)
    "query-32-key-16-one-local": (250, 32, 16, 6, 1, 1, 8, 1, 2, 1, torch.float32, True),
    "no-sink-no-local": (190, 16, 16, 4, 0, 0, 4, 1, 4, 1, torch.float32, True),
    "sink-only-strided-views": (300, 16, 16, 6, 2, 0, 16, 1, 2, 1, torch.float32, False),
    "one-searched-branch": (161, 16, 16, 3, 1, 1, 4, 2, 2, 2, torch.bfloat16, False),
    "nothing-searched": (160, 16, 16, 3, 1, 2, 4, 1, 2, 1, torch.float32, True),
    "query-8-key-16-head-dim-24": (100, 8, 16, 4, 1, 1, 4, 1, 2, 1, torch.float32, True),
    # no local blocks (causal selection's inner estimate): the search reaches the diagonal's key
    # blocks, several per query block, and a round masks only when a centre block reaches the block
    "query-32-key-16-no-local-batch-2-gqa-3": (250, 32, 16, 6, 1, 0, 4, 2, 6, 2, torch.float32, True),
    "query-64-key-16-no-local-no-sink-bf16": (300, 64, 16, 8, 0, 0, 2, 1, 2, 1, torch.bfloat16, True),
    # 66 key blocks of 4: the last row searches 5 rounds, the first searched rows 1 (each row stops
    # after its own rounds, the reference runs 5 for every row)
    "blocks-of-4-one-to-five-rounds": (263, 4, 4, 4, 0, 0, 4, 1, 1, 1, torch.float32, True),
}


SORT_CASES = ("partial-last-block-bf16", "query-16-key-32", "one-searched-branch")  # select="sort": a few


@pytest.mark.parametrize("case,select", [(case, "rank") for case in CASES.values()]
                         + [(CASES[name], "sort") for name in SORT_CASES],
                         ids=[f"{name}-rank" for name in CASES] + [f"{name}-sort" for name in SORT_CASES])
def test_matches_the_reference(case, select, seed, monkeypatch):
    seq, query_block, key_block, top_k, sink, local, rep_keys, batch, q_heads, kv_heads, dtype, head_major = case
    d = 24 if query_block == 8 else 16
    query, key = random_qk(
        seed, batch=batch, q_heads=q_heads, kv_heads=kv_heads, seq=seq, d=d, dtype=dtype, head_major=head_major
    )
    settings = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink,
                    local_blocks=local, representative_keys=rep_keys)
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed})"

    chosen = stream_estimate_triton(query, key, select=select, **settings)
    expected, near_tie = reference_with_near_ties(query, key, monkeypatch, **settings)

    assert chosen.shape == expected.shape and chosen.dtype == torch.int64, message
    assert_rows_valid(chosen, seq, settings, message)
    differs = (chosen != expected).any(-1).cpu()
    assert not (differs & ~near_tie).any(), f"{message}: rows {(differs & ~near_tie).nonzero().tolist()} differ"
    assert near_tie.float().mean() < 0.05, f"{message}: {int(near_tie.sum())} near-tie rows, too many to be noise"


def test_exact_ties_keep_equally_good_blocks(seed):
    # Scores in {0, 1, ..., 16}: exact ties everywhere, and the reference's torch.topk breaks them
    # in its own order. With a searched range of at most 2 * n_search blocks the first round
    # scores every block, so both must keep n_search blocks of the same scores.
    query_block = key_block = 16
    top_k, sink, local = 6, 1, 1
    seq = (sink + local + 2 * (top_k - sink - local)) * key_block - 5
    generator = torch.Generator().manual_seed(seed)
    query = torch.randint(0, 2, (1, 2, seq, 16), generator=generator).float().to(DEVICE)
    key = torch.randint(-1, 2, (1, 1, seq, 16), generator=generator).float().to(DEVICE)
    settings = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink,
                    local_blocks=local, representative_keys=4)
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed})"

    chosen = stream_estimate_triton(query, key, **settings)
    expected = stream_estimate(query, key, **settings)
    assert_rows_valid(chosen, seq, settings, message)
    scores = block_scores(query, key, query_block, key_block, 4)
    searched = slice(sink, top_k - local)
    chosen_scores = scores.gather(-1, chosen[..., searched].clamp(min=0)).sort(-1).values
    expected_scores = scores.gather(-1, expected[..., searched].clamp(min=0)).sort(-1).values
    searched_rows = visible_key_blocks(seq, query_block, key_block).to(DEVICE) > top_k
    assert torch.equal(chosen_scores[:, :, searched_rows], expected_scores[:, :, searched_rows]), message
    assert torch.equal(chosen[:, :, ~searched_rows], expected[:, :, ~searched_rows]), message


def test_a_query_sees_its_own_key(seed):
    # rk = 1 reads key 7 of each 16-key block; with T = 6 * 16 + 8 that key of the diagonal block
    # is the last query's own position, so only the causal ``<=`` lets the diagonal block score.
    # One round scores every searched block (range of 6 = 2 * n_search), so it must be found.
    seq, last = 104, 103
    query, key = random_qk(seed, q_heads=2, kv_heads=1, seq=seq)
    query[:, 1, last] = query[:, 0, last]
    key[:, 0, last] = 10 * query[:, 0, last]
    settings = dict(query_block=16, key_block=16, top_k=4, sink_blocks=1, local_blocks=0, representative_keys=1)
    chosen = stream_estimate_triton(query, key, **settings)
    assert torch.equal(chosen, stream_estimate(query, key, **settings)), f"seed={seed}"
    assert (chosen[:, :, -1] == last // 16).any(-1).all(), f"seed={seed}: {chosen[:, :, -1].tolist()}"


def test_all_scores_equal_still_gives_distinct_causal_rows():
    # Zero queries: every candidate scores 0 (or -inf if empty) in every round, for many rounds.
    query = torch.zeros(1, 2, 290, 16, device=DEVICE)
    key = torch.randn(1, 1, 290, 16, device=DEVICE)
    settings = dict(query_block=16, key_block=16, top_k=5, sink_blocks=0, local_blocks=1, representative_keys=2)
    chosen = stream_estimate_triton(query, key, **settings)
    assert_rows_valid(chosen, 290, settings, "zero queries")


@pytest.mark.parametrize("seq,top_k", [(150, 4), (40, 6)], ids=["searched-rows", "keep-all-rows-only"])
def test_writes_every_element_of_the_output(seq, top_k, seed):
    query, key = random_qk(seed, q_heads=2, kv_heads=1, seq=seq)
    settings = dict(query_block=16, key_block=16, top_k=top_k, sink_blocks=1, local_blocks=1, representative_keys=2)
    poison = -7
    block_indices = torch.full((1, 2, num_blocks(seq, 16), top_k), poison, dtype=torch.int64, device=DEVICE)
    _stream_estimate_into(query, key, block_indices, **settings)
    assert not (block_indices == poison).any(), f"seed={seed}: unwritten elements"
    assert_rows_valid(block_indices, seq, settings, f"seed={seed}")


@pytest.mark.parametrize("query_block,key_block", [(24, 24), (16, 48), (0, 16), (16, -16), (16.0, 16)])
def test_rejects_block_sizes_that_are_not_powers_of_two(query_block, key_block):
    query, key = random_qk(0, seq=64)
    with pytest.raises(BlockSizeError, match="power of two"):
        stream_estimate_triton(query, key, query_block=query_block, key_block=key_block, top_k=4)


def test_rejects_bad_settings_shapes_and_output_buffers():
    query, key = random_qk(0, seq=64)
    with pytest.raises(InvalidConfigError):
        stream_estimate_triton(query, key, query_block=16, key_block=16, top_k=2, sink_blocks=2, local_blocks=1)
    with pytest.raises(InvalidConfigError):
        stream_estimate_triton(query, key, query_block=16, key_block=16, top_k=0)
    with pytest.raises(ShapeError):
        stream_estimate_triton(query[:, :3], key, query_block=16, key_block=16, top_k=4)
    with pytest.raises(ShapeError):
        stream_estimate_triton(query[0], key[0], query_block=16, key_block=16, top_k=4)
    wrong_shape = torch.empty(1, 4, 3, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ShapeError):
        _stream_estimate_into(query, key, wrong_shape, query_block=16, key_block=16, top_k=4)
    wrong_dtype = torch.empty(1, 4, 4, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ShapeError):
        _stream_estimate_into(query, key, wrong_dtype, query_block=16, key_block=16, top_k=4)


# ----- expanded search (expand_levels > 0) ----------------------------------------------------
def assert_expanded_rows_valid(block_indices, seq, settings, message):
    """Sorted, unique, causal, -1 only at the end; searched rows: sinks, locals and between
    n_branches and top_k - sink - local searched blocks; other rows: every visible block."""
    top_k, sink, local = settings["top_k"], settings["sink_blocks"], settings["local_blocks"]
    n_slots = top_k - sink - local
    visible = visible_key_blocks(seq, settings["query_block"], settings["key_block"]).tolist()
    for row_index, rows in enumerate(block_indices.cpu().permute(2, 0, 1, 3).reshape(len(visible), -1, top_k)):
        n_visible = visible[row_index]
        for row in rows.tolist():
            used = [block for block in row if block >= 0]
            assert used == sorted(set(used)) and all(block < n_visible for block in used), (row, message)
            assert row[len(used):] == [-1] * (top_k - len(used)), (row, message)
            if n_visible <= top_k:
                assert used == list(range(n_visible)), (row, message)
                continue
            assert used[:sink] == list(range(sink)), (row, message)
            assert used[len(used) - local:] == list(range(n_visible - local, n_visible)), (row, message)
            n_found = len(used) - sink - local
            assert n_slots >> settings["expand_levels"] <= n_found <= n_slots, (row, message)


def _query_32_aligned_with(key_pos, seed, key_major, monkeypatch):
    """One head of 64 tokens: key ``key_pos`` made to align with query 32 (10x), every later query
    anti-aligned, so that only a causal mask missing where query 32 cannot see that key lets its
    block win. ``key_major``: the keys x queries score tile, else queries x keys (both forced)."""
    monkeypatch.setattr(stream_launch, "MIN_KEY_MAJOR_CANDIDATES", 2 if key_major else 2**20)
    query, key = random_qk(seed, q_heads=1, kv_heads=1, seq=64)
    query[:, 0, 33:] = -query[:, 0, 32:33]
    key[:, 0, key_pos] = 10 * query[:, 0, 32]
    return query, key


@pytest.mark.parametrize("key_major", [False, True], ids=["queries-x-keys", "keys-x-queries"])
def test_a_query_does_not_see_a_later_key_of_its_own_block(seed, key_major, monkeypatch):
    # 32-query blocks over 16-key blocks, one local block: query block 1 (queries 32-63) searches
    # key blocks 1-2, and block 2 (keys 32-47) lies partly after its queries. rk = 1 reads key 7 of
    # a block: key 39, which query 32 must not see.
    query, key = _query_32_aligned_with(39, seed, key_major, monkeypatch)
    settings = dict(query_block=32, key_block=16, top_k=3, sink_blocks=1, local_blocks=1, representative_keys=1)
    chosen = stream_estimate_triton(query, key, **settings)
    assert chosen[0, 0, 1].tolist() == [0, 1, 3], f"seed={seed}"
    assert torch.equal(chosen, stream_estimate(query, key, **settings)), f"seed={seed}"


@pytest.mark.parametrize("key_major", [False, True], ids=["queries-x-keys", "keys-x-queries"])
def test_without_local_blocks_a_round_reaching_the_block_is_masked(seed, key_major, monkeypatch):
    # local_blocks 0, 32-query blocks over 16-key blocks: query block 1 (queries 32-63) searches key
    # blocks 1-3 in one branch; the first round scores [1, 3) by key 23 and [3, 4) by key 55 (rk = 1
    # reads key 7 of a block), which query 32 must not see: only a round left unmasked lets block 3 win.
    query, key = _query_32_aligned_with(55, seed, key_major, monkeypatch)
    settings = dict(query_block=32, key_block=16, top_k=2, sink_blocks=1, local_blocks=0, representative_keys=1)
    chosen = stream_estimate_triton(query, key, **settings)
    assert chosen[0, 0, 1, 0] == 0 and chosen[0, 0, 1, 1] in (1, 2), f"seed={seed}: {chosen[0, 0, 1].tolist()}"
    assert torch.equal(chosen, stream_estimate(query, key, **settings)), f"seed={seed}"


# (seq, query_block, key_block, top_k, sink, local, representative_keys, q_heads, kv_heads, dtype, expand_levels)
EXPANDED_CASES = {
    "expand-2-gqa-fp32": (330, 16, 16, 10, 1, 1, 4, 2, 1, torch.float32, 2),
    "expand-1-bf16-no-local": (290, 16, 16, 7, 1, 0, 8, 2, 2, torch.bfloat16, 1),
    "expand-3-query-32-key-16": (300, 32, 16, 10, 1, 1, 4, 2, 1, torch.float32, 3),
}


@pytest.mark.parametrize("case", EXPANDED_CASES.values(), ids=EXPANDED_CASES.keys())
def test_expanded_search_matches_the_reference(case, seed, monkeypatch):
    seq, query_block, key_block, top_k, sink, local, rep_keys, q_heads, kv_heads, dtype, expand = case
    query, key = random_qk(seed, q_heads=q_heads, kv_heads=kv_heads, seq=seq, d=16, dtype=dtype)
    settings = dict(query_block=query_block, key_block=key_block, top_k=top_k, sink_blocks=sink,
                    local_blocks=local, representative_keys=rep_keys, expand_levels=expand)
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed})"

    chosen = stream_estimate_triton(query, key, **settings)
    expected, near_tie = reference_with_near_ties(query, key, monkeypatch, **settings)

    assert chosen.shape == expected.shape and chosen.dtype == torch.int64, message
    assert_expanded_rows_valid(chosen, seq, settings, message)
    differs = (chosen != expected).any(-1).cpu()
    assert not (differs & ~near_tie).any(), f"{message}: rows {(differs & ~near_tie).nonzero().tolist()} differ"
    assert near_tie.float().mean() < 0.05, f"{message}: {int(near_tie.sum())} near-tie rows, too many to be noise"


def test_expanded_search_writes_every_element_of_the_output(seed):
    query, key = random_qk(seed, q_heads=2, kv_heads=1, seq=250)
    settings = dict(query_block=16, key_block=16, top_k=10, sink_blocks=1, local_blocks=1, representative_keys=2,
                    expand_levels=2)
    poison = -7
    block_indices = torch.full((1, 2, num_blocks(250, 16), 10), poison, dtype=torch.int64, device=DEVICE)
    _stream_estimate_into(query, key, block_indices, **settings)
    assert not (block_indices == poison).any(), f"seed={seed}: unwritten elements"
    assert_expanded_rows_valid(block_indices, 250, settings, f"seed={seed}")


@pytest.mark.parametrize("expand_levels", [-1, 3, 1.0])
def test_rejects_expand_levels_that_do_not_divide_the_searched_slots(expand_levels):
    query, key = random_qk(0, seq=64)
    with pytest.raises(InvalidConfigError, match="expand_levels"):
        stream_estimate_triton(query, key, query_block=16, key_block=16, top_k=6, sink_blocks=1, local_blocks=1,
                               expand_levels=expand_levels)


def test_sort_selection_matches_the_reference_on_a_wide_search(seed, monkeypatch):
    # A rescored estimator's wide search: 18 branches, padded to 32 (CAND_PAD 64), two rounds.
    query, key = random_qk(seed, q_heads=1, kv_heads=1, seq=700, d=16)
    settings = dict(query_block=16, key_block=16, top_k=20, sink_blocks=1, local_blocks=1, representative_keys=1)
    message = f"seed={seed} (replay with SPARSE_LENS_SEED={seed})"
    chosen = stream_estimate_triton(query, key, select="sort", **settings)
    expected, near_tie = reference_with_near_ties(query, key, monkeypatch, **settings)
    assert_rows_valid(chosen, 700, settings, message)
    differs = (chosen != expected).any(-1).cpu()
    assert not (differs & ~near_tie).any(), f"{message}: rows {(differs & ~near_tie).nonzero().tolist()} differ"


def test_sort_selection_keeps_nan_scores_first_and_rejects_unknown_modes():
    # A NaN query scores NaN everywhere it sees: ranked first by both selections (as torch.topk).
    query, key = random_qk(1, q_heads=2, kv_heads=1, seq=200)
    query[:, :, 150] = float("nan")
    settings = dict(query_block=16, key_block=16, top_k=6, sink_blocks=1, local_blocks=1, representative_keys=4)
    assert torch.equal(stream_estimate_triton(query, key, select="sort", **settings),
                       stream_estimate_triton(query, key, select="rank", **settings))
    with pytest.raises(InvalidConfigError, match="select"):
        stream_estimate_triton(query, key, select="heap", **settings)
