"""No tensor with T x T elements or more may be created during a sparse forward pass."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ = 1024


class LargestTensor(TorchDispatchMode):
    """Records the element count and shape of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest[0]:
                self.largest = (tensor.numel(), tuple(tensor.shape), str(func))
        return out


def largest_tensor(model, tokens):
    with torch.no_grad(), LargestTensor() as recorder:
        model.run_with_cache(tokens)
    return recorder.largest


def test_sparse_forward_creates_no_quadratic_tensor():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, keep_qk=True)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    numel, shape, op = largest_tensor(sparse, tokens)
    assert numel < SEQ * SEQ, f"{op} created a tensor of shape {shape}"
    # The detector does catch the dense bridge (so this test can fail).
    numel, shape, op = largest_tensor(dense, tokens)
    assert numel >= SEQ * SEQ


def test_observe_mode_is_chunked_too():
    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=4, mode="observe")
    sparse, _ = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    numel, shape, op = largest_tensor(sparse, tokens)
    assert numel < SEQ * SEQ, f"{op} created a tensor of shape {shape}"
