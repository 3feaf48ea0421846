"""Layers across devices (tl/placement.py): device_map / n_devices / max_memory for from_config and
from_pretrained. On the CPU every target is "cpu", with accelerate's hooks attached as on several
GPUs; the split over two GPUs runs where two are present."""

import pytest
import torch

import sparse_lens as sl
from sparse_lens.errors import InvalidConfigError
from sparse_lens.tl.placement import layer_devices
from tests.byte_tokenizer import VOCAB_SIZE, byte_tokenizer
from tests.conftest import tiny_llama_config

STREAM = sl.StreamConfig(query_block=8, key_block=8, top_k=3, sink_blocks=1, local_blocks=1)
PATTERNS = [f"blocks.{layer}.attn.hook_pattern" for layer in range(2)]
TOKENS = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(1))


def per_module_map(first: str | int, second: str | int) -> dict:
    return {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
            "model.layers.1": second, "model.norm": second, "lm_head": second}


def assert_same_run(model, reference, tokens=TOKENS, atol=1e-5):
    logits, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=PATTERNS)
    expected, expected_cache = reference.run_with_cache(tokens.to(reference.cfg.device), names_filter=PATTERNS)
    torch.testing.assert_close(logits.cpu(), expected.cpu(), atol=atol, rtol=1e-5)
    for name, device in zip(PATTERNS, layer_devices(model)):
        assert cache[name].device == device  # patterns stay on their layer's device
        assert torch.equal(cache[name].block_indices.cpu(), expected_cache[name].block_indices.cpu())


@pytest.mark.parametrize("device_map", [per_module_map("cpu", "cpu"), "auto", "sequential"], ids=str)
def test_from_config_device_map_equals_one_device(device_map, monkeypatch):
    from accelerate.hooks import AlignDevicesHook

    if isinstance(device_map, str) and torch.cuda.is_available():
        pytest.skip("on a CUDA host a string map targets the GPUs: test_layers_on_two_gpus_equal_one covers that")
    reference = sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM, seed=5)
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM, seed=5, device_map=device_map)
    hf_model = model.original_model
    assert set(hf_model.hf_device_map.values()) == {"cpu"} and model.cfg.n_devices == 1
    assert isinstance(getattr(hf_model.model.layers[1], "_hf_hook", None), AlignDevicesHook)
    moved = []
    original = AlignDevicesHook.pre_forward
    monkeypatch.setattr(AlignDevicesHook, "pre_forward",
                        lambda self, module, *a, **k: moved.append(self.execution_device) or original(self, module, *a, **k))
    assert_same_run(model, reference)
    assert moved, "accelerate's device hooks never ran: a split over GPUs would not move activations"
    generated = model.generate(TOKENS[0, :20], max_new_tokens=4)
    assert torch.equal(generated, reference.generate(TOKENS[0, :20], max_new_tokens=4))


def test_logits_to_keep_is_not_moved_to_the_first_device():
    # accelerate sends every tensor argument to the first device; HF indexes the last layer's hidden
    # states with logits_to_keep, so over two GPUs a moved index fails (seen on two H200s). The index
    # is passed on the CPU (positions.logits_kwargs), and the model's hook must leave it there.
    from sparse_lens.analysis.positions import logits_kwargs

    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM, seed=5,
                                                   device_map=per_module_map("cpu", "cpu"))
    hook = model.original_model._hf_hook
    assert "logits_to_keep" in (hook.skip_keys or [])
    assert logits_kwargs(torch.tensor([3, 7]))["logits_to_keep"].device.type == "cpu"


def test_gradients_through_a_placed_model():
    reference = sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM, seed=5)
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), STREAM, seed=5,
                                                   device_map=per_module_map("cpu", "cpu"))
    grads = []
    for each in (model, reference):
        kept = []

        def keep(z, hook):
            z.retain_grad()
            kept.append(z)
            return z

        logits = each.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_z", keep)])
        logits.float().pow(2).mean().backward()
        grads.append(kept[0].grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_from_pretrained_device_map(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB_SIZE)).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    reference = sl.HookedSparseTransformer.from_pretrained(str(tmp_path), STREAM)
    string_maps = () if torch.cuda.is_available() else ("auto",)  # on a CUDA host "auto" targets the GPUs
    for device_map in (per_module_map("cpu", "cpu"), *string_maps):
        model = sl.HookedSparseTransformer.from_pretrained(str(tmp_path), STREAM, device_map=device_map)
        # HF's from_pretrained attaches its device hooks only when the map spans several devices
        assert layer_devices(model) == [torch.device("cpu")] * 2
        assert_same_run(model, reference)


def test_placement_errors():
    config = tiny_llama_config()
    with pytest.raises(InvalidConfigError, match="not both"):
        sl.HookedSparseTransformer.from_config(config, device="cpu", device_map="auto")
    with pytest.raises(InvalidConfigError, match="hold the weights"):
        sl.HookedSparseTransformer.from_config(config, device_map=per_module_map("cpu", "meta"))
    if torch.cuda.device_count() < 64:
        with pytest.raises(InvalidConfigError, match="n_devices=64"):
            sl.HookedSparseTransformer.from_config(config, n_devices=64)


def test_a_device_this_machine_lacks_is_refused_before_loading(monkeypatch):
    """A CUDA device on a machine without one (or past its last GPU), or a name torch does not know:
    InvalidConfigError up front, not torch's AssertionError once the weights are loaded."""
    config = tiny_llama_config()
    with pytest.raises(InvalidConfigError, match="'gpu' is not a torch device"):
        sl.HookedSparseTransformer.from_config(config, device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(InvalidConfigError, match="0 CUDA device.*use device='cpu'"):
        sl.HookedSparseTransformer.from_config(config, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InvalidConfigError, match=r"2 CUDA device\(s\) \(cuda:0 .. cuda:1\)"):
        sl.HookedSparseTransformer.from_config(config, device="cuda:2")
    sl.HookedSparseTransformer.from_config(config, device="cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layers_on_two_gpus_equal_one():
    stream = STREAM.replace(query_block=16, key_block=16)  # Triton's smallest blocks
    # every module built on its GPU with a per-module seed (build_on_devices): the same weights on one GPU and split
    reference = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, device_map={"": 0})
    tokens = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(1))
    for device_map in (per_module_map(0, 1), {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 1,
                                              "model.layers.1": 0, "model.norm": 1, "lm_head": 1}):
        model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, device_map=device_map)
        assert model.cfg.n_devices == 2
        assert [d.index for d in layer_devices(model)] == [device_map["model.layers.0"], device_map["model.layers.1"]]
        for backend in ("auto", "reference"):  # Triton and torch kernels, each on its layer's GPU
            with model.stream_settings(backend=backend), reference.stream_settings(backend=backend):
                assert_same_run(model, reference, tokens, atol=1e-4)
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, n_devices=2)
    assert_same_run(model, reference, tokens, atol=1e-4)


def test_trace_cli_device_map(monkeypatch, tmp_path):
    """``sparse-lens trace --device-map auto`` loads with that map instead of ``--device``."""
    import sparse_lens.cli.trace as trace
    from sparse_lens.cli.main import main

    calls = []

    class Loaded(Exception):
        pass

    def record(name, stream=None, **where):
        calls.append(where)
        raise Loaded

    monkeypatch.setattr(trace.HookedSparseTransformer, "from_pretrained", record)
    for extra, expected in ((["--device-map", "auto"], {"device_map": "auto"}), ([], {"device": "cpu"})):
        with pytest.raises(Loaded):
            main(["trace", "--model", "m", "--device", "cpu", "--length", "256", "--out", str(tmp_path), *extra])
        assert calls[-1] == expected


def test_build_on_devices_weights_depend_on_seed_not_split():
    """The GPU capacity path (meta build, each module allocated and initialised on its device),
    run over "cpu" targets: the weights are the same for two different maps and one seed,
    computed buffers (rotary inv_freq) equal a normal build's, and a different seed differs."""
    from transformers import AutoModelForCausalLM

    from sparse_lens.tl.placement import build_on_devices

    config = tiny_llama_config()
    build = lambda: AutoModelForCausalLM.from_config(config)  # noqa: E731
    whole = build_on_devices(build, {"": "cpu"}, None, seed=3)
    split = build_on_devices(build, per_module_map("cpu", "cpu"), None, seed=3)
    other = build_on_devices(build, {"": "cpu"}, None, seed=4)
    normal = build()
    for (name, mine), theirs, different in zip(whole.state_dict().items(), split.state_dict().values(),
                                               other.state_dict().values()):
        assert mine.device.type == "cpu" and torch.isfinite(mine).all(), name
        assert torch.equal(mine, theirs), name
        if name.endswith("proj.weight"):
            assert not torch.equal(mine, different), name
            assert abs(float(mine.std()) - config.initializer_range) < 0.3 * config.initializer_range, name
    for name, buffer in normal.named_buffers():
        torch.testing.assert_close(dict(whole.named_buffers())[name], buffer)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_attribution_with_offload_on_two_gpus_equals_one():
    """The corrupted run's offloaded segment inputs go back to the GPU their block runs on (they went
    to cfg.device, cuda:0, and a block on cuda:1 failed with a device mismatch at 1M tokens)."""
    from sparse_lens.analysis.attribution_patching import attribution_patching

    stream = STREAM.replace(query_block=16, key_block=16)
    reference = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, device_map={"": 0})
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, device_map=per_module_map(0, 1))
    clean = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[:, :48] = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(2))

    def metric(logits):
        return logits[0, -1, 1].float() - logits[0, -1, 2].float()

    results = [attribution_patching(each, clean.to(each.cfg.device), corrupted.to(each.cfg.device), metric,
                                    positions=[-1], heads=True, offload=True, offload_activations=True,
                                    segment_layers=1)  # a segment starting on cuda:1
               for each in (model, reference)]
    assert abs(results[0].clean_metric - results[1].clean_metric) < 1e-3
    torch.testing.assert_close(results[0].head_out.cpu(), results[1].head_out.cpu(), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fidelity_at_chosen_positions_on_two_gpus_equals_one():
    """``sl.fidelity(positions=...)`` passes logits_to_keep on the CPU: the final hidden states sit on
    the last layer's GPU (cuda:1), where an index on cfg.device (cuda:0) fails."""
    stream = STREAM.replace(query_block=16, key_block=16)
    reference = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, device_map={"": 0})
    model = sl.HookedSparseTransformer.from_config(tiny_llama_config(), stream, seed=5, device_map=per_module_map(0, 1))
    tokens = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(1))
    reports = [sl.fidelity(each, tokens.to(each.cfg.device), positions=torch.tensor([40, 70, 95]))
               for each in (model, reference)]
    for name in ("mass_recall_mean", "oracle_ratio", "next_token_kl", "top1_agreement"):
        assert reports[0][name] == pytest.approx(reports[1][name], abs=1e-3), name
