"""Heads across ranks (Ulysses): 2 gloo processes on the CPU give one process's logits, patterns
(each rank its KV-head group's heads) and gradients; the degree error is named."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_lens as sl
from sparse_lens.errors import SequenceParallelError
from sparse_lens.tl.sequence_parallel import check_degree, gather_sequence, sequence_parallel, shard_sequence
from tests.conftest import tiny_llama_config

WORLD = 2
SEQ = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model() -> sl.HookedSparseTransformer:
    # 8-token blocks, top_k 3 of up to 8 blocks: most query blocks are pruned; 4 q heads, 2 KV heads
    stream = sl.StreamConfig(query_block=8, key_block=8, top_k=3, sink_blocks=1, local_blocks=1)
    return sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=3)


def _squares(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).sum() / (SEQ * logits.shape[-1])


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        tokens = torch.randint(0, 101, (2, SEQ), generator=torch.Generator().manual_seed(7))
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(2)]
        expected_logits, expected_cache = model.run_with_cache(tokens, names_filter=names)
        _squares(model(tokens)).backward()
        expected_grad = model.original_model.get_input_embeddings().weight.grad.clone()
        model.zero_grad(set_to_none=True)

        local_tokens, positions = shard_sequence(tokens)
        assert torch.equal(local_tokens, tokens[:, rank * SEQ // WORLD:(rank + 1) * SEQ // WORLD])
        with sequence_parallel(model):
            local_logits, cache = model.run_with_cache(local_tokens, position_ids=positions, names_filter=names)
            assert local_logits.shape[1] == SEQ // WORLD
            torch.testing.assert_close(gather_sequence(local_logits), expected_logits, atol=1e-5, rtol=1e-5)
            heads = slice(rank * 2, (rank + 1) * 2)  # 4 q heads / 2 ranks: this rank's KV head's group
            for name in names:
                mine, full = cache[name], expected_cache[name]
                assert mine.seq_len == SEQ
                assert torch.equal(mine.block_indices, full.block_indices[:, heads])
                torch.testing.assert_close(mine.block_mass, full.block_mass[:, heads], atol=1e-5, rtol=1e-5)
            local_logits = model(local_tokens, position_ids=positions)
            _squares(local_logits).backward()  # the squares of this rank's positions only
        grad = model.original_model.get_input_embeddings().weight.grad
        dist.all_reduce(grad)  # the full loss is the sum over ranks
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)
        assert "_prefill" not in vars(model.blocks[0].attn)  # the wrapper is gone after the context
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_degree_must_divide_kv_heads():
    check_degree(8, 4)
    check_degree(2, 2)
    with pytest.raises(SequenceParallelError, match="multiple"):
        check_degree(8, 3)
    with pytest.raises(SequenceParallelError):
        check_degree(2, 4)


def test_needs_a_process_group():
    with pytest.raises(SequenceParallelError, match="init_process_group"):
        with sequence_parallel(_model()):
            pass
