"""``sparse-lens trace``: one sparse trace of a needle-in-a-haystack prompt, end to end.

Loads the model, builds a RULER-style needle prompt of ``--length`` tokens (the haystack is
generated, or the user's own document with ``--text FILE``), runs it sparsely with
every layer's pattern cached, scores fidelity against dense attention (where dense is affordable),
lets the model answer (sparse prefill, greedy decode), then makes the figures (recall per layer,
the needle's blocks per layer and head, the route from the answer to the needle, sentence
salience, per-head block heatmaps of a few layers) and writes ``summary.json`` and
``report.html`` (a self-contained page embedding the figures) beside them. The sparse forward,
fidelity and figure passes show progress bars over layers.

``summary.json``'s recall figures (``mass_recall_mean``, ``mass_recall_p5``, ``oracle_ratio``) are
taken over the query blocks where pruning happens in the *pruned layers* only, listed in
``pruned_layers``: the layers whose key blocks the estimator chooses. A layer whose sliding window
binds (Gemma 3's local layers) keeps its whole window band, is exact and is left out of them (its
own row in ``per_layer`` shows recall 1); ``pruned_fraction`` is the mean over every layer.

Defaults are chosen so that a first run finishes in minutes on a laptop CPU and shows real
pruning: 16-token blocks and ``--top-k auto``, which keeps about one key block in 16 at the end of
the prompt (so ~87% of the causal query-key pairs are pruned from 1024 tokens on; shorter prompts
keep at least 2 blocks beyond the sink, local and diagonal ones, so prune less); ``--length`` is
4096 tokens on a GPU and 1024 on the CPU, where the dense comparison (quadratic time) is the
slowest step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from sparse_lens.analysis import collect_dense, fidelity
from sparse_lens.analysis.fidelity_metrics import first_pruned_position
from sparse_lens.analysis.needle import needle_recall
from sparse_lens.cli.config_flags import add_tracing_flags, tracing_config
from sparse_lens.cli.paths import file_in_the_way
from sparse_lens.config import TracingConfig
from sparse_lens.errors import ContextTooLongError, InvalidConfigError
from sparse_lens.data import needle_prompt, string_match_all
from sparse_lens.report.trace import describe, parse_layers, write_trace_figures, write_trace_page
from sparse_lens.tl import DEFAULT_MODEL, HookedSparseTransformer
from sparse_lens.tl.attention import top_k_within_key_blocks

DENSE_FIDELITY_LIMIT = 16_384
GPU_LENGTH, CPU_LENGTH = 4096, 1024
TRACE_BLOCK = 16
AUTO_TOP_K_SHARE = 16  # --top-k auto keeps about 1 / AUTO_TOP_K_SHARE of the last query block's key blocks
AUTO_SEARCHABLE = 2  # --top-k auto keeps at least this many blocks beyond the sink, local and diagonal ones
SAMPLED_POSITIONS = 1024  # positions fidelity scores where the logits at every position would not fit
SHORT_PROMPT = 0.9  # warn when the prompt fills less than this share of --length (a short --text document)
MIN_LENGTH = 128  # tokens a needle prompt needs besides its haystack and answer (chat template, instruction, question)


def auto_top_k(length: int, key_block: int, query_block: int, sink_blocks: int, local_blocks: int) -> int:
    """``--top-k auto``: about one in ``AUTO_TOP_K_SHARE`` of the key blocks a prompt of ``length``
    tokens has (so the share of pruned query-key pairs stays near 1 - 2 / AUTO_TOP_K_SHARE at any
    length), but at least ``AUTO_SEARCHABLE`` blocks beyond the always-kept ones (the sink, local and
    causal-selection diagonal blocks), so the estimator always chooses something; capped at the
    prompt's key blocks, and never below what TracingConfig accepts."""
    n_key_blocks = -(-length // key_block)
    band = -(-query_block // key_block)
    inner_local = max(local_blocks - band, 0)
    always_kept = band + sink_blocks + inner_local
    fewest = max(band + max(1, sink_blocks + inner_local), sink_blocks + local_blocks)  # TracingConfig's minimum
    wanted = max(always_kept + AUTO_SEARCHABLE, -(-n_key_blocks // AUTO_TOP_K_SHARE))
    return max(fewest, min(wanted, n_key_blocks))


def _top_k_argument(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {text!r}")
    return value


def _int_at_least(low: int):
    """An argparse ``type=``: an integer >= ``low``, with an error saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in its messages
    return parse


def _depth_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (0: start of the haystack, 1: end), got {text!r}")
    return value


def _document_argument(text: str) -> Path:
    """``--text``: an existing, non-empty UTF-8 text file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {text} as UTF-8 text ({error})") from None
    if not content.strip():
        raise argparse.ArgumentTypeError(f"{text} has no text")
    return path


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks across arguments, before the model loads (``parser.error`` exits with usage and
    the message)."""
    if args.length is not None and args.length < MIN_LENGTH + args.max_new_tokens:
        parser.error(f"argument --length: must be at least {MIN_LENGTH} + --max-new-tokens "
                     f"({args.max_new_tokens}) = {MIN_LENGTH + args.max_new_tokens} tokens (the instruction, "
                     f"needle, question and answer alone need about {MIN_LENGTH}), got {args.length}")
    blocking = file_in_the_way(args.out)
    if blocking is not None:  # else mkdir fails only after the whole trace has run
        parser.error(f"argument --out: {args.out} cannot be an output directory: {blocking} is a file")
    try:
        parse_layers(args.heatmap_layers, n_layers=2**31)  # the syntax; the range once the model is known
    except ValueError:
        parser.error(f"argument --heatmap-layers: must be 'auto', 'all', 'none' or a comma list of layers, "
                     f"got {args.heatmap_layers!r}")
    top_k = args.top_k if args.top_k != "auto" else auto_top_k(
        args.length or CPU_LENGTH, args.key_block, args.query_block, args.sink_blocks, args.local_blocks)
    try:
        trace_config(args, top_k)
    except InvalidConfigError as error:
        parser.error(f"the block settings: {error}")


def trace_config(args: argparse.Namespace, top_k: int) -> TracingConfig:
    """The TracingConfig of the trace: every generated flag's value, ``top_k`` resolved, the
    estimator's settings flags given, and the fields the command fixes (sparse mode, no queries
    and keys kept in the patterns)."""
    return tracing_config(args, top_k=top_k)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, GGUF path, HF directory or hub id")
    parser.add_argument("--length", type=_int_at_least(1), default=None,
                        help=f"prompt length in tokens, at least {MIN_LENGTH} + --max-new-tokens "
                             f"(default: {GPU_LENGTH} on a GPU, {CPU_LENGTH} on the CPU)")
    parser.add_argument("--text", type=_document_argument, default=None, metavar="FILE",
                        help="trace your own document: FILE's text (UTF-8) is the haystack the needle is hidden in, "
                             "cut to --length tokens (a shorter document gives a shorter prompt, with a warning)")
    parser.add_argument("--out", type=Path, default=Path("trace_out"), help="output directory")
    add_tracing_flags(
        parser, defaults={"query_block": TRACE_BLOCK, "key_block": TRACE_BLOCK, "top_k": "auto"},
        overrides={
            "query_block": {"type": _int_at_least(1), "help": "tokens per query block (default: %(default)s)"},
            "key_block": {"type": _int_at_least(1), "help": "tokens per key block (default: %(default)s)"},
            "top_k": {"type": _top_k_argument,
                      "help": "key blocks kept per query block, or 'auto': about 1 in "
                              f"{AUTO_TOP_K_SHARE} of the prompt's key blocks (~87%% of pairs pruned), but at least "
                              f"{AUTO_SEARCHABLE} blocks beyond the sink, local and diagonal ones (at most all of the "
                              "prompt's blocks; short prompts then prune little)"},
            "sink_blocks": {"type": _int_at_least(0)},
            "local_blocks": {"type": _int_at_least(0)},
            "estimator": {"help": "how key blocks are kept (see TracingConfig.estimator); 'stream' is the fastest "
                                  "(default: %(default)s)"},
        },
    )
    parser.add_argument("--depth", type=_depth_argument, default=0.5, help="needle depth in the haystack, 0..1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=_int_at_least(1), default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the layers over devices (accelerate: auto, balanced, sequential); replaces --device")
    parser.add_argument("--fidelity", choices=["auto", "on", "off"], default="auto",
                        help=f"score against dense attention (auto: up to {DENSE_FIDELITY_LIMIT} tokens)")
    parser.add_argument("--heatmap-layers", default="auto",
                        help="layers whose per-head block heatmaps go into the report: 'auto' (first, last, and "
                             "where the needle is read most), 'all', 'none' or a comma list")


def run(args: argparse.Namespace) -> dict:
    if str(args.model) == DEFAULT_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model needs no hub
    started = time.perf_counter()
    length = args.length or (GPU_LENGTH if str(args.device).startswith("cuda") else CPU_LENGTH)
    top_k = args.top_k
    if top_k == "auto":
        top_k = auto_top_k(length, args.key_block, args.query_block, args.sink_blocks, args.local_blocks)
    haystack = args.text.read_text(encoding="utf-8") if args.text is not None else None
    stream = trace_config(args, top_k)
    device_map = getattr(args, "device_map", None)
    where = {"device_map": device_map} if device_map else {"device": args.device}
    print(f"[1/6] loading {args.model} on {device_map and f'device_map={device_map}' or args.device}", flush=True)
    model = HookedSparseTransformer.from_pretrained(args.model, stream=stream, **where)
    try:
        heatmap_layers = parse_layers(args.heatmap_layers, model.cfg.n_layers)
    except ValueError as error:  # a layer outside this model
        raise SystemExit(f"sparse-lens trace: error: {error}") from None
    source = f"the text of {args.text}" if args.text is not None else "a generated haystack"
    print(f"[2/6] building a needle prompt of up to {length} tokens ({args.max_new_tokens} of them for the answer) "
          f"from {source}", flush=True)
    try:
        sample = needle_prompt(model.tokenizer, length, depth=args.depth, seed=args.seed,
                               answer_tokens=args.max_new_tokens, haystack=haystack)
    except ValueError as error:  # this tokenizer's fixed prompt parts need more than --length allows
        raise SystemExit(f"sparse-lens trace: error: {error} Raise --length.") from None
    tokens = torch.tensor([sample.input_ids], device=model.cfg.device)  # the embedding's device
    if args.top_k == "auto":  # from the prompt's real length
        stream = stream.replace(top_k=auto_top_k(sample.length, args.key_block, args.query_block, args.sink_blocks,
                                                 args.local_blocks))
    stream = _top_k_within_prompt(stream, sample.length)
    model.stream = stream
    print(f"      the prompt has {sample.length} tokens; top_k {stream.top_k} of its "
          f"{-(-sample.length // stream.key_block)} key blocks", flush=True)
    _warn_if_short(sample.length, length - args.max_new_tokens, args.text, stream)

    print(f"[3/6] sparse forward with every layer's pattern cached ({sample.length} tokens)", flush=True)
    forward_started = time.perf_counter()
    with torch.no_grad(), layer_progress(model, "sparse forward"):
        # only the patterns are read: logits at the last position only (a [T, d_vocab] tensor is
        # 4.3 GB at 4,096 tokens of a 262k-token vocabulary)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"),
                                        logits_to_keep=1)
    forward_seconds = time.perf_counter() - forward_started
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    recall = needle_recall(patterns, sample.needle_spans[0])
    pruned_layers = [layer for layer, pattern in enumerate(patterns) if pattern.window is None]  # window: exact

    scores = {}
    if args.fidelity == "on" or (args.fidelity == "auto" and sample.length <= DENSE_FIDELITY_LIMIT):
        print("[4/6] fidelity against dense attention (observe mode, quadratic time)", flush=True)
        scores = fidelity_scores(model, tokens)
    else:
        print(f"[4/6] fidelity skipped ({fidelity_skip_reason(args.fidelity, sample.length)})", flush=True)

    print("[5/6] answering (sparse prefill, greedy decode)", flush=True)
    generated = model.generate(tokens, max_new_tokens=args.max_new_tokens, verbose=True)
    answer = model.tokenizer.decode(generated[0, tokens.shape[1]:], skip_special_tokens=True)

    summary = {
        "model": str(args.model),
        "length": sample.length,
        "document": str(args.text) if args.text is not None else "generated haystack",
        "settings": describe(stream),
        "pruned_fraction": scores.get("pruned_fraction", sum(p.pruned_fraction() for p in patterns) / len(patterns)),
        "pruned_layers": pruned_layers,  # the layers mass_recall_mean/p5 and oracle_ratio are taken over
        "mass_recall_mean": scores.get("mass_recall_mean"),
        "mass_recall_p5": scores.get("mass_recall_p5"),
        "oracle_ratio": scores.get("oracle_ratio"),
        "top1_agreement": scores.get("top1_agreement"),
        "fidelity_positions": scores.get("fidelity_positions"),  # "all", or how many evenly spaced ones were scored
        "next_token_kl": scores.get("next_token_kl"),
        "answer": answer,
        "expected": sample.answers,
        "correct": string_match_all(answer, sample.answers) == 1.0,
        "needle_span": list(sample.needle_spans[0]),
        "needle_kept_fraction": recall.kept_fraction,
        "needle_layers": recall.layers_with_needle(),
        "pattern_bytes": sum(p.nbytes() for p in patterns),
        "forward_seconds": round(forward_seconds, 2),
        "seconds": None,  # set once the figures are written, before the page and summary.json
        "peak_memory_gb": round(_peak_memory_gb(str(model.cfg.device)), 3),
        "device": f"device_map={device_map}" if device_map else str(args.device),
        "plot": "needle_blocks.png",
        "config": stream.to_dict(),
    }
    print("[6/6] per-layer figures and the report", flush=True)
    with staged_output(args.out) as staging:  # nothing lands in --out unless every file was written
        figures = write_trace_figures(
            staging, summary, patterns=patterns, recall=recall, fidelity_layers=scores.get("layers", []),
            sample=sample, tokenizer=model.tokenizer, heatmap_layers=heatmap_layers,
        )
        summary.update(figures.added)
        summary["seconds"] = round(time.perf_counter() - started, 2)  # final: the page and summary.json both show it
        write_trace_page(staging, summary, figures)
        (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: value for key, value in summary.items() if key != "per_layer"}, indent=2))
    print(f"wrote {args.out / 'summary.json'} and the figures; open the report: {args.out / 'report.html'}", flush=True)
    return summary


def fidelity_scores(model: HookedSparseTransformer, tokens: torch.Tensor) -> dict:
    """``sl.fidelity`` against one dense trace, its next-token figures at every position; where those
    logits would not fit (``ContextTooLongError``: e.g. 16k tokens of a 262k vocabulary on a 24 GB
    host), at ``SAMPLED_POSITIONS`` evenly spaced pruned positions instead. ``"fidelity_positions"`` says which."""
    try:
        with layer_progress(model, "dense forward"):
            dense = collect_dense(model, tokens)
    except ContextTooLongError as error:
        seq_len = tokens.shape[1]
        first = min(first_pruned_position(model.stream, seq_len), seq_len - 1)
        positions = torch.linspace(first, seq_len - 1, SAMPLED_POSITIONS).long().unique()
        print(f"      {error}\n      scoring {len(positions)} evenly spaced positions instead", flush=True)
        scores = fidelity(model, tokens, verbose=True, per_layer=True, positions=positions)
        return {**scores, "fidelity_positions": len(positions)}
    with layer_progress(model, "sparse forward (fidelity)"):  # fidelity's own sparse run, after its layer loop
        scores = fidelity(model, tokens, dense=dense, verbose=True, per_layer=True)
    return {**scores, "fidelity_positions": "all"}


def fidelity_skip_reason(setting: str, length: int) -> str:
    """Why ``--fidelity`` ``setting`` skipped the dense comparison of a ``length``-token prompt."""
    if setting == "off":
        return "--fidelity off"
    return (f"the {length}-token prompt is beyond the dense limit of {DENSE_FIDELITY_LIMIT} tokens; "
            "--fidelity on forces it")


def _top_k_within_prompt(stream: TracingConfig, prompt_length: int) -> TracingConfig:
    """``stream`` with ``top_k`` at most the prompt's key blocks (``tl.attention.top_k_within_key_blocks``,
    which every prefill applies too: the same blocks without the empty slots), said once here so
    that the printed budget and ``summary.json``'s config are the ones that run."""
    lowered = top_k_within_key_blocks(stream, prompt_length)
    if lowered is not stream:
        print(f"      top_k {stream.top_k} is more than the prompt's {-(-prompt_length // stream.key_block)} key "
              f"blocks: using top_k {lowered.top_k} (the same blocks, without the empty slots)", flush=True)
    return lowered


def _warn_if_short(prompt_length: int, budget: int, document: Path | None, stream: TracingConfig) -> None:
    """Warnings (stderr) for a prompt well short of the asked length and for a top_k that keeps
    every key block (nothing pruned)."""
    if prompt_length < SHORT_PROMPT * budget:
        cause = f"the document {document} is too short" if document is not None else "the haystack ran out"
        print(f"warning: the prompt has only {prompt_length} tokens, not the {budget} asked for ({cause}); "
              "pass a longer document or a smaller --length", file=sys.stderr, flush=True)
    if stream.top_k >= -(-prompt_length // stream.key_block):
        print(f"warning: top_k {stream.top_k} keeps every one of the prompt's key blocks, so nothing is pruned; "
              "use a longer prompt, smaller blocks or a smaller --top-k", file=sys.stderr, flush=True)


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; once the block succeeds its files move into ``out``
    (created if needed; files of an earlier run with the same names are replaced), ``summary.json``
    last. If the block raises, ``out`` is left as it was and the staging folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        out.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir(), key=lambda path: path.name == "summary.json"):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def layer_progress(model: HookedSparseTransformer, desc: str) -> Iterator[None]:
    """A progress bar ticking once per layer as each layer's ``hook_pattern`` fires."""
    bar = tqdm(total=model.cfg.n_layers, desc=desc, unit="layer")

    def tick(*_: object) -> None:  # returns None: the hook must leave the pattern as it is
        bar.update(1)

    handles = [block.attn.hook_pattern.register_forward_hook(tick) for block in model.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


def _peak_memory_gb(device: str) -> float:
    """Peak GPU memory on CUDA (summed over the GPUs, for layers across devices), else the
    process's peak resident memory."""
    if str(device).startswith("cuda"):
        return sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count())) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
