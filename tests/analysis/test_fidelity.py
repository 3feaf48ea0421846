"""sl.fidelity on a tiny model, every figure recomputed by brute force from dense T x T tensors."""

import copy
import dataclasses
import types

import pytest
import torch

import sparse_lens as sl
from tests.conftest import sparse_and_dense, tiny_llama_config

SEQ, BLOCK, TOP_K = 160, 16, 4


def test_fidelity_figures_match_brute_force():
    stream = sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=TOP_K)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    report = sl.fidelity(sparse, tokens)

    with torch.no_grad(), sparse.stream_settings(mode="observe"):
        _, observed = sparse.run_with_cache(tokens)
    with torch.no_grad():
        dense_logits, dense_cache = dense.run_with_cache(tokens)
        sparse_logits = sparse(tokens)
    n_rows = SEQ // BLOCK
    searched_rows = list(range(TOP_K, n_rows))  # query block j sees j + 1 key blocks
    recalls, oracles, kept_pairs = [], [], 0
    for layer in range(2):
        probs = dense_cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q, k]
        indices = observed[f"blocks.{layer}.attn.hook_pattern"].block_indices[0]
        block_mass = probs.unflatten(-1, (n_rows, BLOCK)).sum(-1).unflatten(1, (n_rows, BLOCK)).mean(2)
        for head in range(probs.shape[0]):
            for row in range(n_rows):
                kept = [b for b in indices[head, row].tolist() if b >= 0]
                for b in kept:
                    for q in range(row * BLOCK, (row + 1) * BLOCK):
                        kept_pairs += sum(1 for k in range(b * BLOCK, (b + 1) * BLOCK) if k <= q)
                if row in searched_rows:
                    recalls.append(float(block_mass[head, row, kept].sum()))
                    oracles.append(float(block_mass[head, row].topk(TOP_K).values.sum()))
    recalls, oracles = torch.tensor(recalls), torch.tensor(oracles)
    dense_logp = dense_logits[0, TOP_K * BLOCK:].log_softmax(-1)
    sparse_logp = sparse_logits[0, TOP_K * BLOCK:].log_softmax(-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)

    assert report["pruned_fraction"] == pytest.approx(1 - kept_pairs / (2 * 4 * SEQ * (SEQ + 1) / 2), abs=1e-9)
    assert report["mass_recall_mean"] == pytest.approx(float(recalls.mean()), abs=1e-5)
    assert report["mass_recall_p5"] == pytest.approx(float(torch.quantile(recalls, 0.05)), abs=1e-5)
    assert report["oracle_recall_mean"] == pytest.approx(float(oracles.mean()), abs=1e-5)
    assert report["oracle_ratio"] == pytest.approx(float(recalls.mean() / oracles.mean()), abs=1e-5)
    assert report["next_token_kl"] == pytest.approx(float(kl.mean()), abs=1e-5)
    assert report["top1_agreement"] == pytest.approx(float((dense_logp.argmax(-1) == sparse_logp.argmax(-1)).float().mean()))
    assert report["positions_scored"] == SEQ - TOP_K * BLOCK
    assert 0 < report["mass_recall_mean"] <= report["oracle_recall_mean"] + 1e-6


def test_fidelity_is_perfect_when_nothing_is_pruned():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=64))
    tokens = torch.randint(0, 90, (1, 100), generator=torch.Generator().manual_seed(0))
    dense = sl.collect_dense(sparse, tokens)
    report = sl.fidelity(sparse, tokens, dense=dense)
    assert report["pruned_fraction"] == 0.0 and report["mass_recall_mean"] == 1.0
    assert report["top1_agreement"] == 1.0 and abs(report["next_token_kl"]) < 1e-6


def test_fidelity_per_layer_figures_add_up_to_the_totals():
    stream = sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=TOP_K)
    sparse, _ = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(0))
    dense = sl.collect_dense(sparse, tokens)
    report = sl.fidelity(sparse, tokens, dense=dense, per_layer=True)
    assert "layers" not in sl.fidelity(sparse, tokens, dense=dense)
    layers = report["layers"]
    assert [row["layer"] for row in layers] == [0, 1]
    # Every layer scores the same number of query blocks, so the totals are the means of the layers.
    assert report["pruned_fraction"] == pytest.approx(sum(row["pruned_fraction"] for row in layers) / 2)
    assert report["mass_recall_mean"] == pytest.approx(sum(row["mass_recall_mean"] for row in layers) / 2, rel=1e-5)
    assert report["oracle_recall_mean"] == pytest.approx(sum(row["oracle_recall_mean"] for row in layers) / 2, rel=1e-5)
    for row in layers:
        assert 0 < row["mass_recall_p5"] <= row["mass_recall_mean"] <= row["oracle_recall_mean"] + 1e-6 <= 1 + 1e-6


def test_adaptive_fidelity_figures_match_brute_force():
    # estimator="adaptive" keeps between min_blocks and top_k blocks per row: fidelity scores every
    # row that sees more than min_blocks key blocks, against the exact top-k at the cap top_k.
    top_k, min_blocks = 6, 2
    stream = sl.StreamConfig(query_block=BLOCK, key_block=BLOCK, top_k=top_k, min_blocks=min_blocks,
                             estimator="adaptive", top_p=0.6)
    sparse, dense = sparse_and_dense(tiny_llama_config(), stream)
    tokens = torch.randint(0, 90, (1, SEQ), generator=torch.Generator().manual_seed(1))
    report = sl.fidelity(sparse, tokens)

    with torch.no_grad(), sparse.stream_settings(mode="observe"):
        _, observed = sparse.run_with_cache(tokens)
    with torch.no_grad():
        dense_logits, dense_cache = dense.run_with_cache(tokens)
        sparse_logits = sparse(tokens)
    n_rows = SEQ // BLOCK
    recalls, oracles, late_recalls, kept_pairs, kept_counts = [], [], [], 0, []
    for layer in range(2):
        probs = dense_cache[f"blocks.{layer}.attn.hook_pattern"][0]
        indices = observed[f"blocks.{layer}.attn.hook_pattern"].block_indices[0]
        block_mass = probs.unflatten(-1, (n_rows, BLOCK)).sum(-1).unflatten(1, (n_rows, BLOCK)).mean(2)
        for head in range(probs.shape[0]):
            for row in range(n_rows):
                kept = [b for b in indices[head, row].tolist() if b >= 0]
                kept_counts.append(len(kept))
                kept_pairs += sum(BLOCK * BLOCK if b < row else BLOCK * (BLOCK + 1) // 2 for b in kept)
                if row + 1 > min_blocks:  # row j sees j + 1 key blocks
                    recalls.append(float(block_mass[head, row, kept].sum()))
                    oracles.append(float(block_mass[head, row].topk(top_k).values.sum()))
                if row + 1 > top_k:
                    late_recalls.append(recalls[-1])
    recalls, oracles = torch.tensor(recalls), torch.tensor(oracles)
    first = min_blocks * BLOCK
    dense_logp, sparse_logp = dense_logits[0, first:].log_softmax(-1), sparse_logits[0, first:].log_softmax(-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)

    assert min(kept_counts) < top_k  # the adaptive rows really keep fewer blocks than the cap
    assert report["pruned_fraction"] == pytest.approx(1 - kept_pairs / (2 * 4 * SEQ * (SEQ + 1) / 2), abs=1e-9)
    assert report["mass_recall_mean"] == pytest.approx(float(recalls.mean()), abs=1e-5)
    assert report["mass_recall_p5"] == pytest.approx(float(torch.quantile(recalls, 0.05)), abs=1e-5)
    assert report["oracle_recall_mean"] == pytest.approx(float(oracles.mean()), abs=1e-5)
    assert report["next_token_kl"] == pytest.approx(float(kl.mean()), abs=1e-5)
    assert report["top1_agreement"] == pytest.approx(float((dense_logp.argmax(-1) == sparse_logp.argmax(-1)).float().mean()))
    assert report["positions_scored"] == SEQ - first
    # Scoring only the rows past top_k (the non-adaptive rule) would give another figure:
    assert abs(float(torch.tensor(late_recalls).mean()) - report["mass_recall_mean"]) > 1e-4


def test_fidelity_refuses_a_dense_trace_of_other_tokens():
    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    tokens = torch.randint(0, 90, (2, 64), generator=torch.Generator().manual_seed(0))
    dense = sl.collect_dense(sparse, tokens)
    sl.fidelity(sparse, tokens, dense=dense)  # its own tokens: accepted
    other = tokens.clone()
    other[1, 40] = (other[1, 40] + 1) % 90
    for wrong in (other, tokens[:1], tokens[:, :48]):  # other ids, another batch, another length
        with pytest.raises(sl.TraceMismatchError):
            sl.fidelity(sparse, wrong, dense=dense)


def figures(report: dict) -> dict:
    return {name: value for name, value in report.items() if name != "estimate_seconds"}  # wall time varies


def test_fidelity_accepts_a_text():
    from tests.byte_tokenizer import VOCAB_SIZE, byte_tokenizer

    stream = sl.StreamConfig(query_block=16, key_block=16, top_k=2)
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(vocab_size=VOCAB_SIZE), stream,
                                                   tokenizer=byte_tokenizer())
    text = "The quick brown fox jumps over the lazy dog, again and again, " * 2
    tokens = model.to_tokens(text)
    assert tokens.shape[1] > 32  # pruning happens
    expected = figures(sl.fidelity(model, tokens))
    assert figures(sl.fidelity(model, text)) == expected
    assert figures(sl.fidelity(model, text, dense=sl.collect_dense(model, text))) == expected
    with pytest.raises(sl.ShapeError):
        sl.fidelity(model, tokens.tolist())
    with pytest.raises(sl.ShapeError, match=r"\[batch, pos\].*shape \(\d+,\)"):  # one sequence without its batch axis
        sl.fidelity(model, tokens[0])


def _windowed_model(family: str, stream: sl.TracingConfig):
    """A tiny random model with layer 0 windowed (16 tokens) and layer 1 global: Gemma 2 (soft-cap
    2.0 on both, weights large enough for the cap to bind), Gemma 3, or gpt-oss (learned sinks)."""
    import transformers
    from transformers import AutoModelForCausalLM

    shape = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=4096, sliding_window=16)
    config = {
        "gemma2": lambda: transformers.Gemma2Config(**shape, intermediate_size=128, attn_logit_softcapping=2.0,
                                                    initializer_range=0.2),
        "gemma3": lambda: transformers.Gemma3TextConfig(**shape, intermediate_size=128,
                                                        layer_types=["sliding_attention", "full_attention"]),
        "gpt-oss": lambda: transformers.GptOssConfig(**shape, intermediate_size=64, num_local_experts=4,
                                                     num_experts_per_tok=2),
    }[family]()
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("sinks"):
                param.copy_(2.0 * torch.randn_like(param))
    return sl.HookedSparseTransformer.from_hf_model(hf_model, None, stream)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gpt-oss"])
def test_windowed_soft_capped_and_sink_layers_are_scored_as_the_model_runs_them(family):
    """The windowed layer 0 keeps its band: recall 1 of what its window sees (a sink's share
    counted as kept), nothing pruned. The global layer 1's recall and oracle equal brute force on
    the dense probabilities with the layer's soft-cap and sinks (the estimate as the model makes it)."""
    from sparse_lens.kernels import estimate_blocks

    seq, block, top_k = 128, 16, 3
    stream = sl.TracingConfig(query_block=block, key_block=block, top_k=top_k, sink_blocks=1, local_blocks=1)
    model = _windowed_model(family, stream)
    tokens = torch.randint(0, 101, (1, seq), generator=torch.Generator().manual_seed(1))
    trace = sl.collect_dense(model, tokens)
    assert trace.window == [16, None] and (trace.softcap == [2.0, 2.0]) == (family == "gemma2")
    assert (trace.sinks[1] is not None) == (family == "gpt-oss")
    report = sl.fidelity(model, tokens, dense=trace, per_layer=True)
    windowed, global_layer = report["layers"]
    assert windowed["mass_recall_mean"] == pytest.approx(1.0, abs=1e-5)
    assert windowed["mass_recall_p5"] == pytest.approx(1.0, abs=1e-5) and windowed["pruned_fraction"] == 0.0

    query, key, lse, features = trace.query[1], trace.key[1], trace.lse[1], trace.features(1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(2, dim=1)) * trace.scale
    if features["softcap"] is not None:
        scores = features["softcap"] * torch.tanh(scores / features["softcap"])
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    if features["sinks"] is not None:  # a sink column in the normaliser, kept by sparse attention
        sink = features["sinks"].float()[None, :, None, None].expand(1, -1, seq, 1)
        probs = torch.cat([scores, sink], -1).softmax(-1)
        probs, sink_probs = probs[..., :-1], probs[..., -1]
    else:
        probs, sink_probs = scores.softmax(-1), torch.zeros(1, 4, seq)
    torch.testing.assert_close(lse, torch.logsumexp(torch.cat([scores, sink], -1) if features["sinks"] is not None
                                                    else scores, -1), atol=1e-4, rtol=1e-4)
    n_rows = seq // block
    block_mass = probs.unflatten(-1, (n_rows, block)).sum(-1).unflatten(2, (n_rows, block)).mean(3)[0]
    sink_mass = sink_probs.unflatten(-1, (n_rows, block)).mean(-1)[0]
    indices = estimate_blocks(query, key, scale=trace.scale, **stream.estimator_kwargs())[0]
    searched = range(top_k, n_rows)
    recalls = torch.tensor([float(block_mass[h, r, [b for b in indices[h, r].tolist() if b >= 0]].sum() + sink_mass[h, r])
                            for h in range(4) for r in searched])
    oracles = torch.tensor([float(block_mass[h, r].topk(top_k).values.sum() + sink_mass[h, r])
                            for h in range(4) for r in searched])
    assert global_layer["mass_recall_mean"] == pytest.approx(float(recalls.mean()), abs=1e-5)
    assert global_layer["oracle_recall_mean"] == pytest.approx(float(oracles.mean()), abs=1e-5)
    assert global_layer["pruned_fraction"] > 0.3 and float(recalls.mean()) < 0.999
    # the all-layer figures are the global layer's: the windowed layer prunes no row
    assert report["mass_recall_mean"] == pytest.approx(float(recalls.mean()), abs=1e-5)
    assert report["pruned_fraction"] == pytest.approx(global_layer["pruned_fraction"] / 2)


def test_next_token_figures_chunked_equal_whole():
    """The position-chunked KL / top-1 equal one whole-sequence computation (chunks of 1, 3 and
    all positions; a first position inside and past the sequence)."""
    from sparse_lens.analysis.fidelity_metrics import next_token_figures

    generator = torch.Generator().manual_seed(0)
    dense, sparse = torch.randn(2, 2, 11, 50, generator=generator)
    for first in (0, 4, 11):
        whole = next_token_figures(dense, sparse, first, chunk_elements=10**9)
        logp, logq = dense[:, first:].log_softmax(-1), sparse[:, first:].log_softmax(-1)
        if first == 11:
            logp, logq = dense[:, -1:].log_softmax(-1), sparse[:, -1:].log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        assert whole["next_token_kl"] == pytest.approx(float(kl.mean()), rel=1e-6)
        assert whole["top1_agreement"] == pytest.approx(float((logp.argmax(-1) == logq.argmax(-1)).float().mean()))
        for chunk in (50, 150):
            assert next_token_figures(dense, sparse, first, chunk_elements=chunk) == pytest.approx(whole, rel=1e-6)


def test_fidelity_refuses_a_dense_trace_of_another_model():
    stream = sl.TracingConfig(query_block=16, key_block=16, top_k=2)
    model, _ = sparse_and_dense(tiny_llama_config(), stream)
    same_shape, _ = sparse_and_dense(tiny_llama_config(), stream, seed=1)  # other weights, same config
    deeper, _ = sparse_and_dense(tiny_llama_config(num_hidden_layers=3), stream)
    tokens = torch.randint(0, 90, (1, 64), generator=torch.Generator().manual_seed(0))
    dense = sl.collect_dense(model, tokens)
    sl.fidelity(model, tokens, dense=dense)  # its own model: accepted
    with pytest.raises(sl.TraceMismatchError, match="another model.*weights"):
        sl.fidelity(same_shape, tokens, dense=dense)
    with pytest.raises(sl.TraceMismatchError, match="n_layers 2 vs 3"):
        sl.fidelity(deeper, tokens, dense=dense)
    unknown = sl.analysis.DenseTrace(dense.logits, dense.query, dense.key, dense.lse, dense.scale)  # e.g. a saved trace
    sl.fidelity(same_shape, tokens, dense=unknown)  # no fingerprint: accepted
    with pytest.raises(sl.TraceMismatchError, match="2 layers, the model 3"):
        sl.fidelity(deeper, tokens, dense=unknown)


def test_a_dense_trace_of_the_same_weights_in_another_dtype_is_refused_saying_so():
    stream = sl.TracingConfig(query_block=16, key_block=16, top_k=2)
    model, _ = sparse_and_dense(tiny_llama_config(), stream)
    other, _ = sparse_and_dense(tiny_llama_config(), stream, seed=1)
    tokens = torch.randint(0, 90, (1, 64), generator=torch.Generator().manual_seed(0))
    dense = sl.collect_dense(model, tokens)
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        cast = copy.deepcopy(model).to(dtype)
        with pytest.raises(sl.TraceMismatchError, match=f"same weights in another dtype: float32 .* vs {name}"):
            sl.fidelity(cast, tokens, dense=dense)
        with pytest.raises(sl.TraceMismatchError, match=f"another model .*dtype, weights: dtype 'float32' vs '{name}'"):
            sl.fidelity(copy.deepcopy(other).to(dtype), tokens, dense=dense)  # other weights, cast too
        # ... and the other way round: a trace of the cast copy, the float32 model.
        with pytest.raises(sl.TraceMismatchError, match=f"same weights in another dtype: {name} .* vs float32"):
            sl.collect_dense(cast, tokens).check_model(model)
    older = dataclasses.replace(dense, model={k: v for k, v in dense.model.items() if k != "dtype"})
    older.check_model(model)  # a fingerprint saved before dtype was recorded: still accepted
    with pytest.raises(sl.TraceMismatchError, match="another model .*weights"):
        older.check_model(copy.deepcopy(model).to(torch.bfloat16))  # no dtype to tell: the weights differ


def test_logits_at_every_position_beyond_free_memory_are_refused_up_front(monkeypatch):
    from sparse_lens.analysis import dense_trace

    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    tokens = torch.randint(0, 90, (2, 64), generator=torch.Generator().manual_seed(0))
    one_forward = 2 * 64 * sparse.cfg.d_vocab * 4  # float32 logits [batch, pos, d_vocab] of a float32 model
    free = lambda room: types.SimpleNamespace(free_bytes=lambda device: room)  # noqa: E731 (fidelity's check only)
    monkeypatch.setattr(dense_trace, "memory", free(2 * one_forward))
    dense = sl.collect_dense(sparse, tokens)  # one forward's logits fit
    sl.fidelity(sparse, tokens, dense=dense)  # the sparse run's only: fits
    sl.fidelity(sparse, tokens)  # two forwards': exactly what is free
    monkeypatch.setattr(dense_trace, "memory", free(2 * one_forward - 1))
    with pytest.raises(sl.ContextTooLongError, match=rf"\[2, 64, {sparse.cfg.d_vocab}\].*positions="):
        sl.fidelity(sparse, tokens)
    sl.fidelity(sparse, tokens, dense=dense)
    monkeypatch.setattr(dense_trace, "memory", free(one_forward - 1))
    with pytest.raises(sl.ContextTooLongError, match="collect_dense"):
        sl.collect_dense(sparse, tokens)
    with pytest.raises(sl.ContextTooLongError, match="fidelity"):
        sl.fidelity(sparse, tokens, dense=dense)
    report = sl.fidelity(sparse, tokens, positions=torch.arange(40, 64))  # a sample of positions: no check
    assert 0 <= report["top1_agreement"] <= 1


def test_the_logits_check_counts_the_model_dtype_original_of_a_bfloat16_model(monkeypatch):
    """A bfloat16 model's logits are made in bfloat16 and cast to float32: 6 bytes a value, not 4."""
    from sparse_lens.analysis import dense_trace

    sparse, _ = sparse_and_dense(tiny_llama_config(), sl.StreamConfig(query_block=16, key_block=16, top_k=2))
    sparse.to(torch.bfloat16)
    tokens = torch.randint(0, 90, (1, 64), generator=torch.Generator().manual_seed(0))
    one_forward = 64 * sparse.cfg.d_vocab * (4 + 2)
    monkeypatch.setattr(dense_trace, "memory", types.SimpleNamespace(free_bytes=lambda device: one_forward - 1))
    with pytest.raises(sl.ContextTooLongError, match="collect_dense"):
        sl.collect_dense(sparse, tokens)
    monkeypatch.setattr(dense_trace, "memory", types.SimpleNamespace(free_bytes=lambda device: one_forward))
    assert sl.collect_dense(sparse, tokens).logits.shape == (1, 64, sparse.cfg.d_vocab)
