import torch

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_qwen2_config


def test_cached_greedy_decode_equals_recomputing_the_whole_sequence():
    # With every block kept, sparse prefill + dense cached decode must equal greedy decoding by
    # re-running the full forward pass for each new token.
    sparse, _ = sparse_and_dense(tiny_qwen2_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    prompt = torch.randint(0, 90, (2, 70), generator=torch.Generator().manual_seed(0))
    generated = sparse.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, sparse(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)
