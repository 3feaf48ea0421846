"""benchmarks/fidelity.py's --dense-cache (load_dense): a reloaded trace is the trace that was saved
(window, soft-cap, sinks, model fingerprint), and a trace of another model is not reused."""

import dataclasses

import torch
import transformers

import sparse_lens as sl
from benchmarks.fidelity import load_dense
from sparse_lens.analysis.fidelity_metrics import DenseTrace

STREAM = sl.TracingConfig(query_block=16, key_block=16, top_k=2, sink_blocks=1, local_blocks=1)
# Gemma 2: layer 0 sliding-window (16 of 64 tokens: it binds), attention logits soft-capped
GEMMA2 = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=16, attn_logit_softcapping=2.0,
              initializer_range=0.2, max_position_embeddings=4096)


def windowed_model(seed):
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**GEMMA2)).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    return sl.HookedSparseTransformer.from_hf_model(hf_model, None, STREAM)


def test_a_reloaded_dense_cache_is_the_saved_trace_and_another_models_is_not_reused(tmp_path):
    model, other = windowed_model(0), windowed_model(1)
    tokens = torch.randint(0, 101, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "dense.pt"
    fresh = load_dense(model, tokens, cache)
    reloaded = load_dense(model, tokens, cache)
    assert fresh.window == reloaded.window == [16, None] and fresh.softcap == reloaded.softcap == [2.0, 2.0]
    for field in dataclasses.fields(DenseTrace):
        assert repr(getattr(reloaded, field.name)) == repr(getattr(fresh, field.name)), field.name
    figures = [{name: value for name, value in sl.fidelity(model, tokens, dense=dense).items() if "seconds" not in name}
               for dense in (fresh, reloaded)]
    assert figures[0] == figures[1]  # the recall of a trace reloaded without its window / cap differed
    theirs = load_dense(other, tokens, cache)  # same tokens, other weights: made again, not the cached one
    assert not torch.equal(theirs.logits, fresh.logits)
    sl.fidelity(other, tokens, dense=theirs)  # its own trace: no TraceMismatchError
