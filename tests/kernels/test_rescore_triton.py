"""The fused rescoring kernel against its torch references (rescore_ref), under the interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from sparse_lens.errors import BlockSizeError, ShapeError
from sparse_lens.kernels.blocks import visible_key_blocks
from sparse_lens.kernels.rescore_ref import (
    exact_candidate_mass,
    fixed_slot_mask,
    rescore_top_k,
    rescore_top_p,
)
from sparse_lens.kernels.rescore_triton import (
    MODE_MASS,
    MODE_TOP_K,
    _launch,
    exact_candidate_mass_triton,
    rescore_top_k_triton,
    rescore_top_p_triton,
)


def random_candidates(seq_len: int, query_block: int, key_block: int, width: int, heads: int,
                      generator: torch.Generator) -> torch.Tensor:
    """[1, heads, n_query_blocks, width]: distinct visible key blocks in random order, the sink
    (block 0) and the diagonal block in most rows, some ``-1`` slots."""
    n_visible = visible_key_blocks(seq_len, query_block, key_block)
    rows = []
    for _ in range(heads):
        head_rows = []
        for visible in n_visible.tolist():
            chosen = torch.randperm(visible, generator=generator)[:width]
            if torch.rand((), generator=generator) < 0.3 and len(chosen) > 2:
                chosen = chosen[:-1]  # an unused slot somewhere
            row = torch.full((width,), -1, dtype=torch.int64)
            slots = torch.randperm(width, generator=generator)[:len(chosen)]
            row[slots] = chosen
            head_rows.append(row)
        rows.append(torch.stack(head_rows))
    return torch.stack(rows)[None].to(DEVICE)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton under TRITON_INTERPRET=1


def inputs(seq_len=136, q_heads=4, kv_heads=2, d_head=32, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, q_heads, seq_len, d_head, generator=generator).to(DEVICE, dtype)
    key = torch.randn(1, kv_heads, seq_len, d_head, generator=generator).to(DEVICE, dtype)
    # a few keys that some queries attend to strongly, so masses are far from uniform
    key[:, :, ::37] *= 3.0
    return query, key, generator


GEOMETRIES = [(16, 16, 6, 1), (32, 16, 8, 3), (16, 32, 4, 4)]  # query_block, key_block, width, query_stride


@pytest.mark.parametrize("query_block,key_block,width,query_stride", GEOMETRIES)
def test_mass_matches_reference(query_block, key_block, width, query_stride):
    query, key, generator = inputs()
    candidates = random_candidates(query.shape[2], query_block, key_block, width, query.shape[1], generator)
    settings = dict(query_block=query_block, key_block=key_block, scale=0.3, query_stride=query_stride)
    expected = exact_candidate_mass(query, key, candidates, **settings)
    got = exact_candidate_mass_triton(query, key, candidates, **settings)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (got[candidates < 0] == 0).all()


def test_mass_bf16_and_default_scale():
    query, key, generator = inputs(dtype=torch.bfloat16, seed=1)
    candidates = random_candidates(query.shape[2], 16, 16, 6, query.shape[1], generator)
    expected = exact_candidate_mass(query.float(), key.float(), candidates, query_block=16, key_block=16)
    got = exact_candidate_mass_triton(query, key, candidates, query_block=16, key_block=16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_every_output_element_is_written():
    query, key, generator = inputs(seq_len=96)
    candidates = random_candidates(96, 16, 16, 5, query.shape[1], generator).to(torch.int32)
    mass = torch.full(candidates.shape, -7.0, device=DEVICE)
    _launch(query, key, candidates, mass, mode=MODE_MASS, query_block=16, key_block=16, scale=0.2, query_stride=1)
    kept = torch.full((*candidates.shape[:3], 3), -7, dtype=torch.int64, device=DEVICE)
    _launch(query, key, candidates, kept, mode=MODE_TOP_K, query_block=16, key_block=16, scale=0.2, query_stride=1,
            sink_blocks=1, local_blocks=1)
    assert (mass != -7).all() and (kept != -7).all()


def clear_rows(candidates, mass, always_keep, n_keep):
    """Rows where the selection does not depend on rounding: the n_keep-th and next rank keys differ
    by more than 1e-4 (n_keep: int or per-row tensor)."""
    rank_key = mass.masked_fill(candidates < 0, -1.0) + always_keep.float() * 2.0
    ordered = rank_key.sort(-1, descending=True).values
    padded = torch.cat([ordered, torch.full_like(ordered[..., :1], -10.0)], -1)
    n_valid = (candidates >= 0).sum(-1, keepdim=True)
    n_keep = torch.as_tensor(n_keep, device=n_valid.device)
    at = torch.minimum(n_keep.expand_as(n_valid), n_valid).clamp(min=1)
    everything_kept = (n_valid <= n_keep).squeeze(-1)
    return everything_kept | ((padded.gather(-1, at - 1) - padded.gather(-1, at)).squeeze(-1) > 1e-4)


@pytest.mark.parametrize("query_block,key_block,width,query_stride", GEOMETRIES)
def test_top_k_matches_reference(query_block, key_block, width, query_stride):
    query, key, generator = inputs(seed=2)
    candidates = random_candidates(query.shape[2], query_block, key_block, width, query.shape[1], generator)
    settings = dict(query_block=query_block, key_block=key_block, top_k=4, sink_blocks=1, local_blocks=1,
                    scale=0.3, query_stride=query_stride)
    expected = rescore_top_k(query, key, candidates, **settings)
    got = rescore_top_k_triton(query, key, candidates, **settings)
    assert got.shape == expected.shape and got.dtype == torch.int64
    mass = exact_candidate_mass(query, key, candidates, query_block=query_block, key_block=key_block, scale=0.3,
                                query_stride=query_stride)
    keep = fixed_slot_mask(candidates, seq_len=query.shape[2], query_block=query_block, key_block=key_block,
                           sink_blocks=1, local_blocks=1)
    clear = clear_rows(candidates, mass, keep, 4)
    assert clear.float().mean() > 0.8  # the comparison below covers most rows
    assert torch.equal(got[clear], expected[clear])


@pytest.mark.parametrize("p,min_blocks", [(0.5, 1), (0.9, 2), (0.7, 3)])
def test_top_p_matches_reference(p, min_blocks):
    query, key, generator = inputs(seed=3)
    candidates = random_candidates(query.shape[2], 16, 16, 8, query.shape[1], generator)
    settings = dict(query_block=16, key_block=16, sink_blocks=1, local_blocks=1, p=p, min_blocks=min_blocks,
                    scale=0.3, query_stride=2)
    expected = rescore_top_p(query, key, candidates, **settings)
    got = rescore_top_p_triton(query, key, candidates, **settings)
    assert got.shape == expected.shape == candidates.shape
    mass = exact_candidate_mass(query, key, candidates, query_block=16, key_block=16, scale=0.3, query_stride=2)
    keep = fixed_slot_mask(candidates, seq_len=query.shape[2], query_block=16, key_block=16, sink_blocks=1,
                           local_blocks=1)
    n_keep = (expected >= 0).sum(-1, keepdim=True)
    rank_key = mass.masked_fill(candidates < 0, -1.0) + keep.float() * 2.0
    sorted_mass = mass.masked_fill(candidates < 0, 0).gather(-1, rank_key.argsort(dim=-1, descending=True, stable=True))
    near_p = ((sorted_mass.cumsum(-1) - p).abs() < 1e-4).any(-1)
    clear = clear_rows(candidates, mass, keep, n_keep) & ~near_p
    assert clear.float().mean() > 0.8
    assert torch.equal(got[clear], expected[clear])
    kept_counts = (expected >= 0).sum(-1)
    assert kept_counts.min() >= 1 and kept_counts.unique().numel() > 1  # the budget adapts per row


def test_bad_inputs_raise():
    query, key, generator = inputs(seq_len=64)
    candidates = random_candidates(64, 16, 16, 4, query.shape[1], generator)
    with pytest.raises(BlockSizeError):
        exact_candidate_mass_triton(query, key, candidates, query_block=24, key_block=24)
    with pytest.raises(ShapeError):
        exact_candidate_mass_triton(query, key, candidates[:, :, :2], query_block=16, key_block=16)
    for bad_stride in (0, 17, True, 2.0):  # a bool is not a stride (bounds_triton refuses it too)
        with pytest.raises(ValueError):
            exact_candidate_mass_triton(query, key, candidates, query_block=16, key_block=16, query_stride=bad_stride)


@pytest.mark.parametrize("estimator", ["rescored", "adaptive"])
def test_estimate_blocks_runs_strided_rescoring_on_the_fused_kernel(estimator):
    # estimate_blocks' Triton branch (Stream's kernel, then this kernel) with a query stride
    # equals the torch path (Stream's reference search, then the reference rescoring).
    from sparse_lens.kernels.estimate import estimate_blocks

    query, key, _ = inputs(seq_len=136, d_head=16, seed=4)
    settings = dict(estimator=estimator, query_block=16, key_block=16, top_k=5, sink_blocks=1, local_blocks=1,
                    beam=2, rescore_query_stride=4, min_blocks=3, top_p=0.8, scale=0.5)
    assert torch.equal(estimate_blocks(query, key, backend="triton", **settings),
                       estimate_blocks(query, key, backend="reference", **settings))


@pytest.mark.parametrize("query_block,key_block,width,query_stride", [(16, 16, 6, 1), (16, 128, 3, 2)])
def test_masked_loop_is_bit_identical(query_block, key_block, width, query_stride):
    # -1 slots and (key_block 128: two key tiles) tiles after the block's last query: with the
    # branch-free loop they are read as masked keys and must add exactly nothing.
    query, key, generator = inputs(seq_len=200 if key_block > 64 else 136, q_heads=2, kv_heads=1, seed=4)
    candidates = random_candidates(query.shape[2], query_block, key_block, width, query.shape[1], generator)
    assert (candidates < 0).any()
    settings = dict(query_block=query_block, key_block=key_block, scale=0.3, query_stride=query_stride)
    masked = exact_candidate_mass_triton(query, key, candidates, masked_loop=True, **settings)
    assert torch.equal(masked, exact_candidate_mass_triton(query, key, candidates, masked_loop=False, **settings))
    torch.testing.assert_close(masked, exact_candidate_mass(query, key, candidates, **settings), atol=2e-5, rtol=1e-4)
    top_k = dict(top_k=2, sink_blocks=1, local_blocks=0, **settings)
    assert torch.equal(rescore_top_k_triton(query, key, candidates, masked_loop=True, **top_k),
                       rescore_top_k_triton(query, key, candidates, masked_loop=False, **top_k))


@pytest.mark.parametrize("seq_len,query_stride", [(128, 1), (136, 1), (128, 3)])
@pytest.mark.parametrize("tuning", [None, {"MASK_ALL": True}, {"HEADS_INNER": True}])
def test_launch_variants_match_reference(seq_len, query_stride, tuning):
    # seq_len 128: whole key tiles (EVEN, unmasked loads; unused slots read at block 0 and masked);
    # 136: a partial last block. The default masks only the tiles some query of the tile cannot see
    # wholly (the diagonal, unused slots), MASK_ALL every tile; HEADS_INNER reorders the grid.
    # A tile skipping a mask it needs would let queries see future keys or block 0 for "-1" slots.
    query, key, generator = inputs(seq_len=seq_len, q_heads=4, kv_heads=2, seed=5)
    candidates = random_candidates(seq_len, 16, 16, 6, query.shape[1], generator).to(torch.int32)
    assert (candidates < 0).any()
    mass = torch.full(candidates.shape, -7.0, device=DEVICE)
    _launch(query, key, candidates, mass, mode=MODE_MASS, query_block=16, key_block=16, scale=0.3,
            query_stride=query_stride, tuning=tuning)
    expected = exact_candidate_mass(query, key, candidates.long(), query_block=16, key_block=16, scale=0.3,
                                    query_stride=query_stride)
    torch.testing.assert_close(mass, expected, atol=2e-5, rtol=1e-4)


# (seq, query_block, key_block, width, query_stride, batch, q_heads, kv_heads, dtype, tuning)
EDGE_CASES = {
    # batch 2, GQA groups of 3 side by side on a query block; 8 of 32 queries sampled
    "batch-2-group-3-heads-inner-stride-3": (150, 32, 16, 5, 3, 2, 6, 2, torch.float32, {"HEADS_INNER": True}),
    # key_block 128: two key tiles; seq 192 a multiple of the 64-key tile (EVEN, unmasked loads) but
    # not of the block, so block 1's second tile lies past seq_len (must be read at block 0, masked)
    "group-1-key-128-tile-past-seq": (192, 16, 128, 2, 5, 2, 2, 2, torch.float32, {"HEADS_INNER": True}),
    # 22 sampled queries in a 32-row tile whose real rows span more than the tile: padding rows
    "group-6-query-64-stride-3": (256, 64, 16, 9, 3, 1, 6, 1, torch.float32, None),
    "query-64-key-32-bf16-stride-7": (130, 64, 32, 4, 7, 2, 3, 3, torch.bfloat16, None),
}


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_edge_geometries_match_reference(case):
    seq_len, query_block, key_block, width, query_stride, batch, q_heads, kv_heads, dtype, tuning = case
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(batch, q_heads, seq_len, 16, generator=generator).to(DEVICE, dtype)
    key = torch.randn(batch, kv_heads, seq_len, 16, generator=generator).to(DEVICE, dtype)
    key[:, :, ::37] *= 3.0
    candidates = torch.cat([random_candidates(seq_len, query_block, key_block, width, q_heads, generator)
                            for _ in range(batch)])
    candidates = candidates.masked_fill(torch.rand(candidates.shape, generator=generator).to(DEVICE) < 0.4, -1)
    settings = dict(query_block=query_block, key_block=key_block, scale=0.3, query_stride=query_stride)
    mass = torch.full(candidates.shape, -7.0, device=DEVICE)
    _launch(query, key, candidates.to(torch.int32), mass, mode=MODE_MASS, tuning=tuning, **settings)
    expected = exact_candidate_mass(query.float(), key.float(), candidates, **settings)
    torch.testing.assert_close(mass, expected, atol=1e-4 if dtype == torch.bfloat16 else 2e-5, rtol=1e-3)
    # top_k 3: rows with fewer valid candidates keep them all, then -1
    kept = rescore_top_k_triton(query, key, candidates, top_k=3, sink_blocks=1, local_blocks=0, **settings)
    reference = rescore_top_k(query.float(), key.float(), candidates, top_k=3, sink_blocks=1, local_blocks=0,
                              **settings)
    keep = fixed_slot_mask(candidates, seq_len=seq_len, query_block=query_block, key_block=key_block,
                           sink_blocks=1, local_blocks=0)
    clear = clear_rows(candidates, expected, keep, 3)
    assert clear.float().mean() > 0.8 and ((candidates >= 0).sum(-1) < 3).any()
    assert torch.equal(kept[clear], reference[clear])
