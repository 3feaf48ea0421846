"""Block checkpointing (and MLP chunk checkpointing) gives the plain backward's gradients."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.tl.checkpointing import checkpoint_blocks, is_recomputing
from tests.conftest import sparse_and_dense, tiny_llama_config

TOKENS = torch.randint(0, 90, (1, 96), generator=torch.Generator().manual_seed(0))


def gradients(model, *, lean: bool, offload: bool = False):
    """Gradients of a last-position logit difference w.r.t. the embedding output, every parameter and
    layer 1's block gates; plus how often each hook_pattern hook ran while recomputing."""
    parameters = [p for p in model.blocks.parameters() if p.requires_grad]  # the embedding output is a leaf
    passes = {"first": 0, "recompute": 0}
    gates = {}

    def embed_leaf(value, hook):
        gates["embed"] = value.detach().requires_grad_(True)
        return gates["embed"]

    def gate_hook(pattern, hook):
        passes["recompute" if is_recomputing(model) else "first"] += 1
        gate = gates.setdefault("gate", torch.ones_like(pattern.block_mass, requires_grad=True))
        return pattern.with_gate(gate)

    hooks = [("hook_embed", embed_leaf), ("blocks.1.attn.hook_pattern", gate_hook)]
    context = checkpoint_blocks(model, offload=offload) if lean else torch.enable_grad()
    with context, model.hooks(fwd_hooks=hooks), torch.enable_grad():
        logits = model(TOKENS, logits_to_keep=1)
        value = logits[0, -1, 3] - logits[0, -1, 8]
        grads = torch.autograd.grad(value, [gates["embed"], gates["gate"], *parameters])
    return grads, passes


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_gradients_equal_plain_gradients(offload):
    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    model.mlp_chunk_tokens = 40  # chunks are checkpointed too
    plain, plain_passes = gradients(model, lean=False)
    lean, lean_passes = gradients(model, lean=True, offload=offload)
    assert plain_passes == {"first": 1, "recompute": 0}
    assert lean_passes == {"first": 1, "recompute": 1}  # the block really was recomputed
    assert plain[1].abs().sum() > 0 and plain[0].abs().sum() > 0
    for expected, actual in zip(plain, lean):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    # Nothing is left installed: forwards without the context are plain again.
    assert "forward" not in model.blocks[0].__dict__


def test_checkpointing_changes_no_forward_and_nests():
    model, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), sl.StreamConfig(query_block=16, key_block=16, top_k=3))
    with torch.no_grad():
        plain = model(TOKENS)
    with model.lean_backward() as outer, checkpoint_blocks(model) as inner:
        assert inner is outer
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), plain)
    assert not outer.installed
