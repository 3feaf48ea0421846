"""The documented limit of attribution patching (docs/concepts.md, "It is a linear estimate"):
close to exact patching for a small corruption, but for a large one it can take the wrong sign.
Exact reference: TransformerLens' head-output patching of the corrupted run's ``hook_z`` into the
clean run (the change attribution patching estimates), on the same sparse model."""

from pathlib import Path

import torch
from transformer_lens import patching

import sparse_lens as sl
from sparse_lens.analysis.attribution_patching import attribution_patching
from tests.conftest import sparse_and_dense, tiny_llama_config

CONCEPTS = Path(__file__).parents[2] / "docs" / "concepts.md"


def test_the_linear_estimate_is_close_for_a_small_corruption_and_can_flip_sign_for_a_large_one():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=8, key_block=8, top_k=2,
                                                                       keep_qk=False))
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 90, (1, 32), generator=generator)
    answer = int(clean[0, -1])
    metric = lambda logits: logits[0, -1, answer] - logits[0, -1].mean()  # noqa: E731
    small = clean.clone()
    small[0, 5] = (small[0, 5] + 1) % 90  # one token changed
    large = torch.randint(0, 90, (1, 32), generator=generator)  # another prompt

    def estimate_and_exact(corrupted):
        estimate = attribution_patching(sparse, clean, corrupted, metric).head_out.float()
        _, corrupted_cache = sparse.run_with_cache(corrupted)
        with torch.no_grad():
            exact = patching.get_act_patch_attn_head_out_all_pos(sparse, clean, corrupted_cache, metric)
            return estimate, exact - metric(sparse(clean))

    estimate, exact = estimate_and_exact(small)
    torch.testing.assert_close(estimate, exact, atol=2e-3, rtol=0.1)
    assert torch.equal(estimate.sign(), exact.sign())

    estimate, exact = estimate_and_exact(large)
    clear = (estimate.abs() > 5e-3) & (exact.abs() > 5e-3)
    assert ((estimate.sign() != exact.sign()) & clear).any()  # a head the estimate gets the wrong way round
    assert "take the wrong sign" in " ".join(CONCEPTS.read_text(encoding="utf-8").split())  # and the docs say so
