import pytest
import torch

import sparse_lens as sl
from sparse_lens.kernels.stream import stream_estimate
from sparse_lens.kernels.sparse_attention import block_sparse_attention


def make_pattern(seq=100, block=16, top_k=3, keep_qk=True, batch=1):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 4, seq, 8, generator=generator)
    key = torch.randn(batch, 2, seq, 8, generator=generator)
    value = torch.randn(batch, 2, seq, 8, generator=generator)
    indices = stream_estimate(query, key, query_block=block, key_block=block, top_k=top_k, sink_blocks=1, local_blocks=1)
    _, lse, mass = block_sparse_attention(query, key, value, indices, query_block=block, key_block=block, scale=0.3)
    return sl.BlockSparsePattern(indices, mass, lse, seq, block, block, 0.3, "sparse",
                                 query if keep_qk else None, key if keep_qk else None)


def test_pruned_fraction_counts_token_pairs():
    pattern = make_pattern()
    dense = pattern.token_probs()
    kept = int((dense > 0).sum())  # every kept causal pair has positive probability
    assert pattern.pruned_fraction() == pytest.approx(1 - kept / (4 * 100 * 101 / 2))
    assert int(pattern.kept_pairs().sum()) == kept


@pytest.mark.parametrize("window", [1, 7, 20, 200])
@pytest.mark.parametrize("query_block, key_block", [(8, 8), (8, 4), (4, 8)])
def test_pruned_fraction_of_a_windowed_layer_is_relative_to_what_its_window_sees(window, query_block, key_block):
    """Against brute force: kept pairs are causal, inside the window and in a kept block; the
    denominator is the pairs the window lets the layer see. A layer keeping its window band prunes 0."""
    from sparse_lens.kernels.window import window_band

    seq, heads = 37, 2
    band = window_band(seq, query_block, key_block, window)
    generator = torch.Generator().manual_seed(window)
    indices = band.expand(1, heads, -1, -1).clone()
    indices[0, 1] = torch.where(torch.rand(band.shape, generator=generator) < 0.5, band, -1)  # head 1 drops some
    pattern = sl.BlockSparsePattern(indices, torch.zeros(indices.shape), torch.zeros(1, heads, seq), seq, query_block,
                                    key_block, 0.3, window=window)
    q, k = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    visible = (k <= q) & (k > q - window)
    kept = torch.zeros(heads, seq, seq, dtype=torch.bool)
    for head in range(heads):
        for row in range(indices.shape[2]):
            for block in indices[0, head, row].tolist():
                if block >= 0:
                    kept[head, row * query_block:(row + 1) * query_block, block * key_block:(block + 1) * key_block] = True
    kept &= visible
    assert pattern.kept_pairs()[0].tolist() == kept.sum((-1, -2)).tolist()
    assert pattern.visible_pairs() == int(visible.sum())
    assert pattern.pruned_fraction() == pytest.approx(1 - float(kept.sum()) / (heads * int(visible.sum())))
    whole_band = sl.BlockSparsePattern(band.expand(1, heads, -1, -1), torch.zeros(1, heads, *band.shape),
                                       torch.zeros(1, heads, seq), seq, query_block, key_block, 0.3, window=window)
    assert whole_band.pruned_fraction() == 0.0


def test_recall_kept_pairs_and_pruned_fraction_of_a_batch_and_of_a_slice():
    """Against token_probs (every kept causal pair has positive probability): recall 1 per row in
    sparse mode, the pruned fraction over every batch row and head, a slice's pairs its rows' only."""
    pattern = make_pattern(batch=3)  # 100 tokens, blocks of 16 (7 query blocks)
    kept = pattern.token_probs() > 0
    torch.testing.assert_close(pattern.recall(), torch.ones(3, 4, 7))
    assert pattern.pruned_fraction() == pytest.approx(1 - int(kept.sum()) / (3 * 4 * 100 * 101 / 2))
    sliced = pattern[:, :, 40:70]  # query blocks 2-4: tokens 32-79
    assert sliced.kept_pairs().tolist() == kept[:, :, 32:80].sum((-1, -2)).tolist()


def test_size_limits_are_inclusive_and_count_both_sides():
    pattern = make_pattern()  # 100 tokens, 7 blocks a side
    assert pattern.token_probs(max_tokens=100).shape == (1, 4, 100, 100)
    assert pattern.to_string(max_blocks=7)
    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 96, 8, generator=generator), torch.randn(1, 2, 96, 8, generator=generator)
    indices = stream_estimate(query, key, query_block=32, key_block=16, top_k=3, sink_blocks=1, local_blocks=2)
    wide = sl.BlockSparsePattern(indices, torch.zeros(indices.shape), torch.zeros(1, 4, 96), 96, 32, 16, 0.3)
    assert all(len(line) == 6 for line in wide.to_string(limit=1, max_blocks=6).splitlines()[2:5])  # 6 key blocks
    with pytest.raises(sl.ContextTooLongError):
        wide.to_string(max_blocks=5)  # 3 query blocks but 6 key blocks


def test_token_probs_rows_sum_to_one_and_limit_is_enforced():
    pattern = make_pattern()
    torch.testing.assert_close(pattern.token_probs().sum(-1), torch.ones(1, 4, 100))
    with pytest.raises(sl.ContextTooLongError):
        pattern.token_probs(max_tokens=64)
    for bad in (0, -5, None, "4096", 4096.0):  # not a limit: a named error, not "100 > -5" or a TypeError
        with pytest.raises(sl.InvalidConfigError, match="max_tokens must be an int >= 1"):
            pattern.token_probs(max_tokens=bad)
    with pytest.raises(sl.IncompletePatternError, match="keep_qk"):
        make_pattern(keep_qk=False).token_probs()
    sliced = pattern[:, :, 70:]  # the last query blocks: the four whole-pattern methods refuse it by name
    assert sliced.is_sliced
    for method in (sliced.token_probs, sliced.to_block_mask, sliced.to_string, sliced.pruned_fraction):
        with pytest.raises(sl.IncompletePatternError, match="sliced along queries"):
            method()


def test_to_dense_is_a_deprecated_alias_of_token_probs():
    pattern = make_pattern()
    with pytest.warns(DeprecationWarning, match="token_probs"):
        dense = pattern.to_dense()
    assert torch.equal(dense, pattern.token_probs())


def test_tensor_protocol_used_by_the_cache():
    pattern = make_pattern()
    moved = pattern.detach().to("cpu").clone()
    assert isinstance(moved, sl.BlockSparsePattern) and torch.equal(moved.block_indices, pattern.block_indices)
    assert pattern.to(torch.float64).block_mass.dtype == torch.float64
    assert pattern.to(torch.float64).block_indices.dtype == torch.int64
    assert pattern.ndim == pattern.dim() == 4 and pattern.shape == (1, 4, 100, 100)
    sliced = pattern[:, :, 40:70]
    assert sliced.first_query_block == 2 and sliced.n_query_blocks == 3
    assert torch.equal(sliced.block_indices, pattern.block_indices[:, :, 2:5])
    with pytest.raises(sl.DensePatternRequiredError):
        pattern[:, 1]
    with pytest.raises(ValueError, match="sliced"):
        sliced.pruned_fraction()
    assert pattern.nbytes() < pattern.nbytes(include_qk=True)


def test_cuda_and_cpu_move_the_pattern_as_to_does(monkeypatch):
    pattern = make_pattern()
    on_cpu = pattern.cpu()
    assert isinstance(on_cpu, sl.BlockSparsePattern) and torch.equal(on_cpu.block_mass, pattern.block_mass)
    if torch.cuda.is_available():
        moved = pattern.cuda()
        assert moved.block_mass.is_cuda and moved.block_indices.is_cuda and moved.query.is_cuda
        assert torch.equal(moved.cpu().block_indices, pattern.block_indices)
    moves = []
    monkeypatch.setattr(sl.BlockSparsePattern, "to", lambda self, *args, **kwargs: moves.append((args, kwargs)))
    for device in (None, 1, "cuda:1", torch.device("cuda", 1)):
        pattern.cuda(device)
    pattern.cuda(non_blocking=True)
    cuda, cuda_1 = torch.device("cuda"), torch.device("cuda", 1)
    assert [args for args, _ in moves] == [(cuda,), (cuda_1,), (cuda_1,), (cuda_1,), (cuda,)]
    assert moves[-1][1] == {"non_blocking": True}
    with pytest.raises(sl.InvalidConfigError, match="CUDA device"):
        pattern.cuda("cpu")


def test_shape_mismatch_is_rejected():
    pattern = make_pattern()
    with pytest.raises(sl.ShapeError):
        sl.BlockSparsePattern(pattern.block_indices, pattern.block_mass[..., :2], pattern.lse, 100, 16, 16, 0.3)


# ----- batch axis (ActivationCache.remove_batch_dim / apply_slice_to_batch_dim) -------------------
def test_batch_indexing_slices_every_tensor_consistently():
    pattern = make_pattern(batch=3).with_gate(torch.rand(3, 4, 7, 3, generator=torch.Generator().manual_seed(2)))
    row = pattern[1]
    assert not row.has_batch_dim and row.ndim == 3 and row.shape == (4, 100, 100) and row.size(0) == 4
    for name in ("block_indices", "block_mass", "lse", "query", "key", "block_gate"):
        assert torch.equal(getattr(row, name), getattr(pattern, name)[1]), name
    torch.testing.assert_close(row.token_probs(), pattern.token_probs()[1])
    assert torch.equal(row.kept_pairs(), pattern.kept_pairs()[1])
    picked = pattern[[0, 2]]
    assert picked.has_batch_dim and torch.equal(picked.lse, pattern.lse[[0, 2]])
    assert torch.equal(pattern[1:2].key, pattern.key[1:2])
    assert torch.equal(row.unsqueeze(0).block_indices, pattern[1:2].block_indices)
    assert pattern.squeeze(0) is pattern  # batch 3: nothing to squeeze, as Tensor.squeeze
    assert not pattern[1:2].squeeze(0).has_batch_dim
    # a row's pruned fraction is its own, not the batch's
    single = make_pattern(batch=3)[2]
    assert single.pruned_fraction() == pytest.approx(
        1 - float(make_pattern(batch=3).kept_pairs()[2].sum()) / (4 * 100 * 101 / 2))


def test_query_slicing_without_batch_dim():
    pattern = make_pattern()[0]
    sliced = pattern[:, 40:70]
    assert sliced.first_query_block == 2 and torch.equal(sliced.block_indices, pattern.block_indices[:, 2:5])


def test_dense_only_operations_raise_a_named_error():
    pattern = make_pattern()
    with pytest.raises(sl.DensePatternRequiredError, match="hook_block_indices"):
        pattern[:, 2, :, :]  # what layer_head_pattern_patch_setter reads
    with pytest.raises(sl.DensePatternRequiredError):
        pattern[:, :, 5, 3]
    with pytest.raises(sl.DensePatternRequiredError, match="get_act_patch_attn_head_pattern"):
        pattern[:, :, :] = 0


# ----- torch.stack (ActivationCache.stack_activation) -------------------------------------------
def test_stacking_equal_geometry_gives_a_layer_axis():
    first, second = make_pattern(), make_pattern(top_k=3).with_block_indices(make_pattern().block_indices.flip(-1))
    stack = torch.stack([first, second])
    assert isinstance(stack, sl.BlockSparsePatternStack) and len(stack) == 2 and stack[1] is second
    assert stack.block_indices.shape == (2, 1, 4, 7, 3) and stack.shape == (2, 1, 4, 100, 100)
    assert torch.equal(stack.block_indices[1], second.block_indices)
    assert torch.equal(stack.lse[0], first.lse) and stack.kv_num_blocks.dtype == torch.int32


def test_stacking_different_geometry_is_refused():
    with pytest.raises(sl.PatternGeometryError, match="top_k|shape"):
        torch.stack([make_pattern(top_k=3), make_pattern(top_k=4)])
    with pytest.raises(sl.PatternGeometryError, match="seq_len"):
        torch.stack([make_pattern(seq=96), make_pattern(seq=100)])
    with pytest.raises(sl.PatternGeometryError):
        torch.stack([make_pattern(), make_pattern()], dim=1)
    with pytest.raises(TypeError):
        torch.cat([make_pattern(), make_pattern()])


# ----- FlexAttention vocabulary -------------------------------------------------------------------
def test_flex_vocabulary_describes_the_compact_list():
    pattern = make_pattern()
    assert pattern.BLOCK_SIZE == (16, 16)
    assert pattern.kv_num_blocks.dtype == torch.int32 and pattern.kv_num_blocks.shape == (1, 4, 7)
    assert torch.equal(pattern.kv_num_blocks, (pattern.block_indices >= 0).sum(-1).int())
    assert pattern.kv_num_blocks[0, 0, 0] == 1 and pattern.kv_num_blocks[0, 0, -1] == 3
    assert torch.equal(pattern.kv_indices, pattern.block_indices.int())


def _token_mask(pattern):
    """Brute force: query q sees key k iff k <= q and k's block is kept in q's row."""
    seq = pattern.seq_len
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    kept = torch.zeros(*pattern.block_indices.shape[:3], -(-seq // pattern.key_block) + 1, dtype=torch.bool)
    kept.scatter_(-1, torch.where(pattern.block_indices >= 0, pattern.block_indices, kept.shape[-1] - 1), True)
    return kept[:, :, q // pattern.query_block, k // pattern.key_block] & (k <= q)


@pytest.mark.parametrize("query_block,key_block", [(16, 16), (32, 16)])
def test_block_mask_selects_exactly_our_blocks(query_block, key_block):
    from torch.nn.attention.flex_attention import BlockMask

    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 96, 8, generator=generator), torch.randn(1, 2, 96, 8, generator=generator)
    indices = stream_estimate(query, key, query_block=query_block, key_block=key_block, top_k=3, sink_blocks=1,
                              local_blocks=2)
    indices[0, 1, -1] = torch.tensor([-1, 5, 2])  # an unsorted row with a hole: only used slots count
    pattern = sl.BlockSparsePattern(indices, torch.zeros(indices.shape), torch.zeros(1, 4, 96), 96, query_block,
                                    key_block, 0.3).validated()
    mask = pattern.to_block_mask()
    assert isinstance(mask, BlockMask) and mask.BLOCK_SIZE == (query_block, key_block)
    block_level = torch.zeros(1, 4, pattern.n_query_blocks, 96 // key_block + 1, dtype=torch.bool)
    block_level.scatter_(-1, torch.where(pattern.block_indices >= 0, pattern.block_indices, 96 // key_block), True)
    block_level = block_level[..., :-1]  # the last column collected the unused slots
    assert torch.equal(mask.to_dense().bool(), block_level)
    # token level: kept blocks and the causal mask_mod inside them
    q, k = torch.arange(96)[:, None], torch.arange(96)[None, :]
    batch, head = torch.arange(1)[:, None, None, None], torch.arange(4)[None, :, None, None]
    from_blocks = block_level[:, :, q // query_block, k // key_block]
    assert torch.equal(from_blocks & mask.mask_mod(batch, head, q, k), _token_mask(pattern))
    assert torch.equal(mask.mask_mod(batch, head, q, k), _token_mask(pattern))  # also where evaluated densely


def test_flex_attention_on_the_block_mask_reproduces_sparse_attention():
    from torch.nn.attention.flex_attention import flex_attention

    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(1, h, 64, 16, generator=generator) for h in (4, 2, 2))
    indices = stream_estimate(query, key, query_block=16, key_block=16, top_k=2, sink_blocks=1, local_blocks=1)
    z, lse, mass = block_sparse_attention(query, key, value, indices, query_block=16, key_block=16, scale=0.25)
    pattern = sl.BlockSparsePattern(indices, mass, lse, 64, 16, 16, 0.25)
    try:
        flex = flex_attention(query, key, value, block_mask=pattern.to_block_mask(), scale=0.25, enable_gqa=True)
    except Exception as error:  # noqa: BLE001 - eager flex_attention is not available on every CPU build
        pytest.skip(f"flex_attention does not run eagerly here: {error}")
    torch.testing.assert_close(flex, z, atol=1e-5, rtol=1e-5)


def test_block_mask_export_is_refused_beyond_its_memory_limit():
    pattern = make_pattern()
    needed = (2 * 4 + 1) * 4 * 7 * 7
    with pytest.raises(sl.ContextTooLongError, match="GiB"):
        pattern.to_block_mask(max_bytes=needed - 1)
    pattern.to_block_mask(max_bytes=needed)
    with pytest.raises(ValueError, match="sliced"):
        pattern[:, :, 50:].to_block_mask()


def test_to_string_draws_kept_pruned_and_non_causal_blocks():
    pattern = make_pattern(top_k=2)
    text = pattern.to_string(limit=2)
    assert text.count("head ") == 2 and "2 more" in text
    grid = text.splitlines()[2:9]  # batch 0, head 0
    assert len(grid) == 7 and all(len(line) == 7 for line in grid)
    for row, line in enumerate(grid):
        kept = {int(b) for b in pattern.block_indices[0, 0, row] if b >= 0}
        assert {i for i, c in enumerate(line) if c == "█"} == kept
        assert {i for i, c in enumerate(line) if c == " "} == set(range(row + 1, 7))
    with pytest.raises(sl.ContextTooLongError):
        pattern.to_string(max_blocks=4)


def test_token_probs_of_a_windowed_capped_sink_layer_equal_a_dense_softmax():
    """A layer with window 20, soft-cap 2 and sinks: token_probs over the whole window band (the
    exact case) equals a plain masked, capped softmax with a sink column; dropping any feature fails."""
    from sparse_lens.kernels.window import window_band

    seq, block, scale, window, softcap = 70, 16, 0.5, 20, 2.0
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, h, seq, 8, generator=generator) * 2 for h in (4, 2, 2))
    sinks = torch.randn(4, generator=generator)
    band = window_band(seq, block, block, window)
    indices = band.expand(2, 4, *band.shape)
    features = dict(window=window, softcap=softcap, sinks=sinks)
    _, lse, mass = block_sparse_attention(query, key, value, indices, query_block=block, key_block=block,
                                          scale=scale, **features)
    pattern = sl.BlockSparsePattern(indices, mass, lse, seq, block, block, scale, "sparse", query, key, **features)
    scores = softcap * torch.tanh(torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(2, 1)) * scale / softcap)
    positions = torch.arange(seq)
    visible = (positions[None] <= positions[:, None]) & (positions[None] > positions[:, None] - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    expected_lse = torch.logsumexp(torch.cat([scores, sinks[None, :, None, None].expand(2, 4, seq, 1)], -1), -1)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(pattern.token_probs(), torch.exp(scores - expected_lse[..., None]))
    torch.testing.assert_close(pattern.token_probs().sum(-1) + pattern.sink_probs(), torch.ones(2, 4, seq))
    # The per-head sinks have no batch axis: batch indexing and unsqueeze leave them whole.
    single = pattern[1]
    assert torch.equal(single.sinks, sinks) and single.window == window and single.softcap == softcap
    torch.testing.assert_close(single.token_probs(), pattern.token_probs()[1])
    assert torch.equal(single.unsqueeze(0).sinks, sinks) and torch.equal(pattern[:1].sinks, sinks)
    assert torch.equal(make_pattern().sink_probs(), torch.zeros(1, 4, 100))
    with pytest.raises(sl.ShapeError, match="sinks"):
        sl.BlockSparsePattern(indices, mass, lse, seq, block, block, scale, sinks=sinks[:2])


def test_a_stack_indexes_its_layer_axis_then_the_patterns():
    first, second, third = make_pattern(batch=2), make_pattern(batch=2, top_k=3), make_pattern(batch=2)
    stack = torch.stack([first, second, third])
    assert stack[1] is second and stack[-1] is third and stack[torch.tensor(0)] is first
    assert torch.equal(stack[1, 0].block_indices, second.block_indices[0])  # was a bare TypeError
    assert torch.equal(stack[2, :, :, 40:70].block_indices, third.block_indices[:, :, 2:5])
    rows = stack[:, 1]  # every layer's batch row 1, still a stack
    assert isinstance(rows, sl.BlockSparsePatternStack) and torch.equal(rows.block_indices, stack.block_indices[:, 1])
    assert isinstance(stack[1:], sl.BlockSparsePatternStack) and stack[1:].patterns == (second, third)
    for bad in (1.0, True, [0, 1]):
        with pytest.raises(IndexError):
            stack[bad]
