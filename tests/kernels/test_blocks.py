import pytest
import torch

from sparse_lens.kernels.blocks import (
    blocks_overlapping,
    causal_pairs,
    kept_pairs_per_slot,
    sort_block_row,
    visible_key_blocks,
)


def brute_force_pairs(block_indices, seq_len, query_block, key_block):
    pairs = torch.zeros(block_indices.shape, dtype=torch.int64)
    for row in range(block_indices.shape[0]):
        for slot, block in enumerate(block_indices[row].tolist()):
            if block < 0:
                continue
            for query in range(row * query_block, min((row + 1) * query_block, seq_len)):
                keys = range(block * key_block, min((block + 1) * key_block, seq_len))
                pairs[row, slot] += sum(1 for key in keys if key <= query)
    return pairs


def test_kept_pairs_closed_form_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    for seq_len, query_block, key_block in [(50, 8, 8), (53, 16, 4), (37, 4, 16), (64, 8, 8)]:
        n_rows = -(-seq_len // query_block)
        visible = visible_key_blocks(seq_len, query_block, key_block)
        block_indices = torch.full((n_rows, 3), -1)
        for row in range(n_rows):
            chosen = torch.randperm(int(visible[row]), generator=generator)[:3]
            block_indices[row, : len(chosen)] = chosen
        expected = brute_force_pairs(block_indices, seq_len, query_block, key_block)
        assert torch.equal(kept_pairs_per_slot(block_indices, seq_len, query_block, key_block), expected)


def test_all_visible_blocks_cover_every_causal_pair():
    seq_len, query_block, key_block = 45, 8, 4
    visible = visible_key_blocks(seq_len, query_block, key_block)
    width = int(visible.max())
    slots = torch.arange(width)
    block_indices = torch.where(slots < visible[:, None], slots, -1)
    assert int(kept_pairs_per_slot(block_indices, seq_len, query_block, key_block).sum()) == causal_pairs(seq_len)


def test_sort_block_row_puts_unused_slots_last():
    row = torch.tensor([[5, -1, 2, 9], [-1, -1, 0, 3]])
    assert sort_block_row(row).tolist() == [[2, 5, 9, -1], [0, 3, -1, -1]]


@pytest.mark.parametrize("block", [1, 3, 8, 16])
def test_blocks_overlapping_is_every_block_holding_a_token_of_the_span(block):
    for start in range(0, 40):
        for end in range(start + 1, 41):
            brute = [b for b in range(41 // block + 2) if any(b * block <= t < (b + 1) * block for t in range(start, end))]
            assert list(blocks_overlapping((start, end), block)) == brute, (start, end, block)


@pytest.mark.parametrize("span, block", [((5, 5), 4), ((6, 5), 4), ((-1, 3), 4), ((0, 3), 0)])
def test_empty_negative_spans_and_bad_blocks_raise(span, block):
    with pytest.raises(ValueError, match="blocks_overlapping"):
        blocks_overlapping(span, block)
