import torch

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_qwen2_config


def test_mlp_chunking_keeps_logits_and_hooks():
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 90, (1, 150), generator=torch.Generator().manual_seed(0))
    names = lambda name: name.endswith("mlp.hook_out")  # noqa: E731
    with torch.no_grad():
        logits, cache = sparse.run_with_cache(tokens, names_filter=names)
        sparse.mlp_chunk_tokens = 32
        chunked_logits, chunked_cache = sparse.run_with_cache(tokens, names_filter=names)
        sparse.mlp_chunk_tokens = None
        again = sparse(tokens)
    torch.testing.assert_close(chunked_logits, logits, atol=1e-5, rtol=1e-5)
    assert chunked_cache["blocks.1.mlp.hook_out"].shape == (1, 150, 96)
    torch.testing.assert_close(chunked_cache["blocks.1.mlp.hook_out"], cache["blocks.1.mlp.hook_out"], atol=1e-5, rtol=1e-5)
    assert torch.equal(again, logits)


def test_logits_to_keep_returns_only_the_last_positions():
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=4))
    tokens = torch.randint(0, 90, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(tokens, logits_to_keep=1), sparse(tokens)[:, -1:])
