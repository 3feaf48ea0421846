"""benchmarks/real_model_check.py reads the prose as the model reads a text: after the tokenizer's BOS
where it adds one (Gemma's does; it fed none, unlike benchmarks/fidelity.py run)."""

from types import SimpleNamespace

import sparse_lens as sl
from benchmarks.real_model_check import check_length
from tests.benchmarks.test_real_model_helpers import BOS, bos_byte_tokenizer
from tests.byte_tokenizer import VOCAB_SIZE
from tests.conftest import sparse_and_dense, tiny_llama_config


def test_the_check_feeds_the_tokenizers_bos_first():
    stream = sl.TracingConfig(query_block=16, key_block=16, top_k=2)
    model, _ = sparse_and_dense(tiny_llama_config(vocab_size=VOCAB_SIZE + 1), stream)
    model.tokenizer = bos_byte_tokenizer()
    seen = []
    handle = model.embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        args = SimpleNamespace(block=16, top_k=2, estimator="rescored", device="cpu", hf_max=0)
        rows = check_length(model, None, args, 64)
    finally:
        handle.remove()
    assert seen and all(ids.shape == (1, 64) and int(ids[0, 0]) == BOS for ids in seen)
    assert [row["run"] for row in rows] == ["nothing pruned", "pruned"]
