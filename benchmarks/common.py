"""Pieces every benchmark script shares: model shapes, a random-init model of a shape, one timed
run with its peak GPU memory, CUDA-event medians, and the JSON / markdown-table output.

- ``SHAPES``: shape name -> (transformers config class name, its settings), the published
  configs of the models benchmarked (random-init: only the shapes matter);
- :func:`build_model`: a random-init ``HookedSparseTransformer`` of a shape (``keep_qk=False`` by
  default, MLPs chunked);
- :func:`load_real_model`, :func:`model_from_args`, :func:`text_tokens`: a real checkpoint
  (``--model``, :func:`add_real_model_flag`) instead of a shape, and its input: the shipped prose
  after the tokenizer's BOS (:func:`clean_and_corrupted` uses it for models with a tokenizer);
- :func:`cached_forward`: one forward with every layer's ``hook_pattern`` cached, last position's
  logits only;
- :func:`timed`: seconds and peak GPU GB of one call, an error recorded as the row's ``error``;
  :func:`device_profile`: one call under ``torch.profiler``, its costliest GPU kernels;
- :func:`time_cuda`: median seconds over CUDA-event-timed repeats; :func:`dense_sdpa`: the dense
  baseline (cuDNN / flash SDPA on CUDA);
- :func:`parse_config`: ``estimator:block:top_k[:field=value...]`` -> a ``TracingConfig``;
- :func:`add_stream_flags`, :func:`add_model_flags`: the command-line flags of the estimator
  and of a random-init model;
- :func:`environment`, :func:`machine`, :func:`command`, :func:`save_json`, :func:`print_table`:
  what every result file starts with, how it was run, writing it (``RESULTS``: the results
  folder), and printing a table.

Imports no TransformerLens at module level (``kernels.py`` and ``rescore.py`` use it too).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"

# ----- model shapes ---------------------------------------------------------------------------------
LONG_CONTEXT = 1 << 21  # max_position_embeddings of every shape: RoPE tables up to 2M positions
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=LONG_CONTEXT,
                  rope_theta=1_000_000.0, tie_word_embeddings=True)
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=LONG_CONTEXT,
                  rope_theta=500_000.0, tie_word_embeddings=False)
R1_DISTILL_QWEN_32B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                           num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=LONG_CONTEXT,
                           rope_theta=1_000_000.0, tie_word_embeddings=False)
LLAMA31_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=LONG_CONTEXT,
                   rope_theta=500_000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=LONG_CONTEXT)  # CPU smoke runs

SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-1.5b": ("Qwen2Config", QWEN25_15B),
    "llama-3.1-8b": ("LlamaConfig", LLAMA31_8B),
    "r1-distill-qwen-32b": ("Qwen2Config", R1_DISTILL_QWEN_32B),
    "llama-3.1-70b": ("LlamaConfig", LLAMA31_70B),
    "tiny": ("LlamaConfig", TINY),
}


def attention_heads(shape: str) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head dim)`` of a shape (one layer's attention, for kernels)."""
    settings = SHAPES[shape][1]
    heads = settings["num_attention_heads"]
    return heads, settings["num_key_value_heads"], settings["hidden_size"] // heads


def hf_config(shape: str, *, layers: int | None = None, **overrides: Any) -> Any:
    """The shape's transformers config; ``layers`` (when given) replaces its layer count, ``overrides``
    replace other settings."""
    import transformers

    class_name, settings = SHAPES[shape]
    settings = {**settings, **overrides}
    if layers:
        settings["num_hidden_layers"] = layers
    return getattr(transformers, class_name)(**settings)


def build_model(shape: str | Any, *, layers: int | None = None, stream: Any = None,
                dtype: str | torch.dtype = "bfloat16", device: str | None = None, mlp_chunk: int = 65536,
                **placement: Any) -> Any:
    """A random-init ``HookedSparseTransformer`` of ``shape`` (a ``SHAPES`` name or a transformers
    config). ``stream``: default ``TracingConfig(keep_qk=False)`` (patterns keep indices, masses and
    lse only); ``mlp_chunk``: MLPs run over this many positions at a time; ``placement``: other
    ``from_config`` keywords (``seed``, ``device_map``, ``n_devices``)."""
    import sparse_lens as sl

    config = hf_config(shape, layers=layers) if isinstance(shape, str) else shape
    model = sl.HookedSparseTransformer.from_config(
        config, stream if stream is not None else sl.TracingConfig(keep_qk=False),
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        **({"device": device} if device is not None else {}), **placement)
    model.mlp_chunk_tokens = mlp_chunk
    return model


def parse_config(text: str) -> Any:
    """``estimator:block:top_k[:field=value...]`` -> TracingConfig (sink 1, local 1, query block =
    key block, ``keep_qk=False`` unless a field says otherwise, e.g. ``local_blocks=0``), e.g. ``rescored:16:16`` or ``adaptive:16:128:top_p=0.93``; a
    ``field`` is a TracingConfig field or one of the estimator's own settings (``top_p`` ->
    ``AdaptiveSettings.top_p``), each typed as its ``sparse-lens`` flag is
    (``causal_selection=false``, ``observe_max_tokens=none``)."""
    import sparse_lens as sl
    from sparse_lens.cli.config_flags import parse_field  # typed as the command-line flags are
    from sparse_lens.kernels.registry import get_estimator

    name, block, top_k, *rest = text.split(":")
    fields = {field: value for field, _, value in (item.partition("=") for item in rest)}
    estimator = get_estimator(name)
    own = {field: parse_field(estimator.settings, field, value) for field, value in fields.items()
           if field in estimator.setting_names()}
    shared = {field: parse_field(sl.TracingConfig, field, value) for field, value in fields.items() if field not in own}
    shared = {"sink_blocks": 1, "local_blocks": 1, "keep_qk": False, **shared}  # a field given overrides these
    return sl.TracingConfig(query_block=int(block), key_block=int(block), top_k=int(top_k), estimator=name,
                            estimator_settings=estimator.settings(**own), **shared)


def is_pattern(name: str) -> bool:
    """``names_filter`` of ``run_with_cache`` that keeps every layer's ``hook_pattern``."""
    return name.endswith("hook_pattern")


def cached_forward(model, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, list]:
    """One forward without gradients, every layer's ``hook_pattern`` cached and the last position's
    logits only: ``(logits [batch, 1, d_vocab], patterns in layer order)`` (none in ``mode="dense"``).
    ``kwargs`` go to ``run_with_cache`` (e.g. ``use_cache=False``, ``position_ids``)."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=is_pattern, logits_to_keep=1, **kwargs)
    return logits, [cache[name] for name in cache.keys()]


def clean_and_corrupted(model, length: int, device: str, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, length]`` clean tokens and a copy whose first half is replaced (seed: ``length`` unless
    given). A model with a tokenizer (a real checkpoint, :func:`load_real_model`): the shipped prose
    (:func:`text_tokens`, essays in a seeded order), the first half replaced by other prose (the
    BOS kept); a random-init model (no tokenizer): random ids."""
    seed = length if seed is None else seed
    if getattr(model, "tokenizer", None) is not None:
        clean = torch.tensor([text_tokens(model.tokenizer, length, seed=seed)])
        corrupted = clean.clone()
        start = len(bos_tokens(model.tokenizer))
        other = text_tokens(model.tokenizer, length, seed=seed + 1, bos=False)
        corrupted[:, start: length // 2] = torch.tensor(other[: max(0, length // 2 - start)])
        return clean.to(device), corrupted.to(device)
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (1, length), generator=generator)
    corrupted = clean.clone()
    corrupted[:, : length // 2] = torch.randint(0, model.cfg.d_vocab, (1, length // 2), generator=generator)
    return clean.to(device), corrupted.to(device)


# ----- real checkpoints -------------------------------------------------------------------------------
def load_real_model(name: str, *, stream: Any = None, dtype: str | torch.dtype = "float32", device: str | None = None,
                    mlp_chunk: int = 65536) -> Any:
    """A real checkpoint as a ``HookedSparseTransformer`` (``name``: anything ``from_pretrained``
    takes: a package spec, a ``.gguf`` path, a ``save_pretrained`` directory such as
    ``benchmarks/gguf_to_dir.py`` writes); ``stream`` (default ``TracingConfig(keep_qk=False)``),
    ``dtype`` (GGUF weights are dequantised to it), ``mlp_chunk`` as :func:`build_model`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sparse_lens as sl

    model = sl.HookedSparseTransformer.from_pretrained(
        name, stream=stream if stream is not None else sl.TracingConfig(keep_qk=False),
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, **({"device": device} if device else {}))
    model.mlp_chunk_tokens = mlp_chunk
    return model


def model_from_args(args: Any, shape: str | None = None, stream: Any = None) -> Any:
    """``--model`` (a real checkpoint, :func:`load_real_model`) when given, else the random-init
    ``shape`` (default ``args.shape``) with ``--layers``; ``--dtype``, ``--device``, ``--mlp-chunk``."""
    if getattr(args, "model", None):
        return load_real_model(args.model, stream=stream, dtype=args.dtype, device=args.device, mlp_chunk=args.mlp_chunk)
    return build_model(shape or args.shape, layers=args.layers, stream=stream, dtype=args.dtype, device=args.device,
                       mlp_chunk=args.mlp_chunk)


def bos_tokens(tokenizer: Any) -> list[int]:
    """``[bos id]`` when ``tokenizer`` puts a BOS before a text (Gemma), else ``[]`` (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


def text_tokens(tokenizer: Any, length: int, *, seed: int = 0, bos: bool = True) -> list[int]:
    """``length`` token ids of the shipped prose (``sparse_lens.data.prose_tokens``: CC0 essays in
    a ``seed``-ed order) as the model reads a text: after its BOS when its tokenizer adds one
    (``bos=False``: never). Without a BOS the ids are exactly ``prose_tokens``'."""
    from sparse_lens.data import prose_tokens

    start = bos_tokens(tokenizer) if bos else []
    return (start + prose_tokens(tokenizer, length - len(start), seed=seed))[:length]


# ----- timing -----------------------------------------------------------------------------------------
def describe(error: BaseException) -> str:
    """One line for a row's ``error``: ``out of memory: ...`` or ``ErrorType: message`` (shortened)."""
    if isinstance(error, torch.OutOfMemoryError):
        return f"out of memory: {str(error).splitlines()[0][:160]}"
    return f"{type(error).__name__}: {str(error)[:200]}"


def timed(device: str, work: Callable[[], Any], *, key: str = "result",
          catch: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,), every_gpu: bool = False) -> dict:
    """Run ``work()`` once and return its row: ``{key: work()}`` or, when it raises one of ``catch``,
    ``{"error": describe(error)}`` (recorded, not fatal: the next row still runs); on CUDA then
    ``peak_gpu_gb`` (``torch.cuda.max_memory_allocated`` in GiB since the start, the memory held
    before included), or with ``every_gpu`` ``peak_gb``: one such figure per GPU; last ``seconds``,
    wall time to the end of the work or to the error (CUDA synchronised at both ends)."""
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        for index in range(torch.cuda.device_count()) if every_gpu else [None]:
            torch.cuda.reset_peak_memory_stats(index)
        torch.cuda.synchronize()
    started = time.perf_counter()
    try:
        row = {key: work()}
        if cuda:
            torch.cuda.synchronize()
    except catch as error:
        row = {"error": describe(error)}
    seconds = time.perf_counter() - started
    if cuda:
        if every_gpu:
            row["peak_gb"] = [round(torch.cuda.max_memory_allocated(index) / 2**30, 2)
                              for index in range(torch.cuda.device_count())]
        else:
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    row["seconds"] = seconds
    return row


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs timed with CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def dense_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Dense causal attention, the baseline: cuDNN (flash fallback) SDPA on CUDA, GQA; torch's SDPA elsewhere.
    ``query [batch, q_heads, T, d_head]``, ``key``/``value [batch, kv_heads, T, d_head]``."""
    if not query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


# ----- flags ------------------------------------------------------------------------------------------
def add_stream_flags(parser: Any) -> None:
    """``--block`` (tokens, query and key blocks), ``--top-k`` (blocks kept per query block), ``--estimator``,
    ``--settings`` (the estimator's own settings as ``field=value`` pairs, e.g.
    ``--settings beam=8 representative_keys=2 rescore_query_stride=4``; :func:`estimator_settings`)."""
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--estimator", default="rescored")
    parser.add_argument("--settings", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="the estimator's own settings (fields of its settings class), e.g. beam=8")


def estimator_settings(estimator: str, pairs: list[str]) -> Any:
    """The settings object of ``estimator`` with ``pairs`` (``["beam=8", ...]``) applied, typed as the
    command line types them; ``None`` when ``pairs`` is empty (the estimator's defaults).

    Raises:
        KeyError: a field the estimator's settings class does not have.
        ValueError: a pair without ``=`` or a value of the wrong type.
    """
    if not pairs:
        return None
    from sparse_lens.cli.config_flags import parse_field
    from sparse_lens.kernels.registry import get_estimator

    cls = get_estimator(estimator).settings
    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--settings takes FIELD=VALUE pairs, got {pair!r}")
        values[name] = parse_field(cls, name, text)
    return cls(**values)


def add_model_flags(parser: Any) -> None:
    """``--mlp-chunk`` (positions per MLP chunk), ``--dtype`` (a torch dtype's name), ``--device``."""
    parser.add_argument("--mlp-chunk", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_real_model_flag(parser: Any) -> None:
    """``--model``: a real checkpoint instead of the random-init shape (:func:`model_from_args`)."""
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="a real checkpoint instead of the random-init shape: a .gguf path, a package spec or a "
                             "save_pretrained directory (benchmarks/gguf_to_dir.py); inputs are then the shipped prose")


# ----- output -----------------------------------------------------------------------------------------
def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def machine() -> str:
    """This CPU machine in words (for runs without a GPU)."""
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def device_profile(fn: Callable[[], Any], device: str, top: int) -> dict:
    """``fn()`` once under ``torch.profiler``: the ``top`` GPU kernels and copies by device time
    (``self_device_time_total``: microseconds in the profiler, milliseconds here), the total device
    milliseconds and the wall seconds of the profiled call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    # GPU kernels and copies only (device_type CUDA): an op's row (aten::mm) repeats its kernels' time
    events = [event for event in prof.key_averages()
              if event.self_device_time_total > 0 and event.device_type == DeviceType.CUDA]
    total_ms = sum(event.self_device_time_total for event in events) / 1e3
    events.sort(key=lambda event: event.self_device_time_total, reverse=True)
    rows = [{"name": event.key[:120], "calls": event.count, "device_ms": event.self_device_time_total / 1e3,
             "share": event.self_device_time_total / 1e3 / total_ms if total_ms else 0.0} for event in events[:top]]
    return {"wall_s_profiled": wall, "device_ms_total": total_ms, "top": rows}


def environment(device: str, *, triton: bool = True) -> dict:
    """What a result file starts with: ``date``, ``device`` (its name), ``torch`` (and ``triton``)."""
    found = {"date": time.strftime("%Y-%m-%d"), "device": device_name(device), "torch": torch.__version__}
    return found | ({"triton": triton_version()} if triton else {})


def config(args: Any) -> dict:
    """The parsed flags, JSON-able (``--out`` as a string)."""
    return vars(args) | {"out": str(args.out)}


def command(script: str, python: str = "python") -> str:
    """The command line that ran ``benchmarks/<script>`` (this process's arguments)."""
    return f"{python} benchmarks/{script} " + " ".join(sys.argv[1:])


def save_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` (folders made), indented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    """A markdown table: ``columns`` as its header, one line per list of (already formatted) cells."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in rows:
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
