"""``sparse-lens trace``: one sparse trace of a needle-in-a-haystack prompt, end to end.

Loads the model, builds a RULER-style needle prompt of ``--length`` tokens, runs it sparsely with
every layer's pattern cached, scores fidelity against dense attention (where dense is affordable),
lets the model answer (sparse prefill, greedy decode), then makes the figures (recall per layer,
the needle's blocks per layer and head, the route from the answer to the needle, sentence
salience, per-head block heatmaps of a few layers) and writes ``summary.json`` and
``report.html`` (a self-contained page embedding the figures) beside them. The sparse forward,
fidelity and figure passes show progress bars over layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from sparse_lens.analysis import collect_dense, fidelity
from sparse_lens.analysis.needle import needle_recall
from sparse_lens.cli.trace_report import parse_layers, write_trace_report
from sparse_lens.config import ESTIMATORS, StreamConfig
from sparse_lens.data import needle_prompt, score_answer
from sparse_lens.tl import DEFAULT_MODEL, HookedSparseTransformer

DENSE_FIDELITY_LIMIT = 16_384


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, GGUF path, HF directory or hub id")
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--out", type=Path, default=Path("trace_out"), help="output directory")
    parser.add_argument("--query-block", type=int, default=64)
    parser.add_argument("--key-block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16, help="key blocks kept per query block")
    parser.add_argument("--sink-blocks", type=int, default=1)
    parser.add_argument("--local-blocks", type=int, default=1)
    parser.add_argument("--estimator", choices=ESTIMATORS, default=StreamConfig().estimator,
                        help="how key blocks are kept (see StreamConfig.estimator); 'stream' is the fastest")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack, 0..1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fidelity", choices=["auto", "on", "off"], default="auto",
                        help=f"score against dense attention (auto: up to {DENSE_FIDELITY_LIMIT} tokens)")
    parser.add_argument("--heatmap-layers", default="auto",
                        help="layers whose per-head block heatmaps go into the report: 'auto' (first, last, and "
                             "where the needle is read most), 'all', 'none' or a comma list")


def run(args: argparse.Namespace) -> dict:
    if str(args.model) == DEFAULT_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model needs no hub
    started = time.perf_counter()
    stream = StreamConfig(
        query_block=args.query_block, key_block=args.key_block, top_k=args.top_k,
        sink_blocks=args.sink_blocks, local_blocks=args.local_blocks, estimator=args.estimator, mode="sparse",
        keep_qk=False,
    )
    print(f"[1/6] loading {args.model}", flush=True)
    model = HookedSparseTransformer.from_pretrained(args.model, stream=stream, device=args.device)
    heatmap_layers = parse_layers(args.heatmap_layers, model.cfg.n_layers)
    print(f"[2/6] building a {args.length}-token needle prompt", flush=True)
    sample = needle_prompt(model.tokenizer, args.length, depth=args.depth, seed=args.seed, answer_tokens=args.max_new_tokens)
    tokens = torch.tensor([sample.input_ids], device=args.device)

    print(f"[3/6] sparse forward with every layer's pattern cached ({sample.length} tokens)", flush=True)
    forward_started = time.perf_counter()
    with torch.no_grad(), layer_progress(model, "sparse forward"):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    forward_seconds = time.perf_counter() - forward_started
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    recall = needle_recall(patterns, sample.needle_spans[0])

    scores = {}
    if args.fidelity == "on" or (args.fidelity == "auto" and sample.length <= DENSE_FIDELITY_LIMIT):
        print("[4/6] fidelity against dense attention (observe mode, quadratic time)", flush=True)
        with layer_progress(model, "dense forward"):
            dense = collect_dense(model, tokens)
        scores = fidelity(model, tokens, dense=dense, verbose=True, per_layer=True)
        del dense
    else:
        print("[4/6] fidelity skipped (sequence beyond the dense limit; --fidelity on forces it)", flush=True)

    print("[5/6] answering (sparse prefill, greedy decode)", flush=True)
    generated = model.generate(tokens, max_new_tokens=args.max_new_tokens)
    answer = model.tokenizer.decode(generated[0, tokens.shape[1]:], skip_special_tokens=True)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": str(args.model),
        "length": sample.length,
        "config": stream.to_dict(),
        "pruned_fraction": scores.get("pruned_fraction", sum(p.pruned_fraction() for p in patterns) / len(patterns)),
        "mass_recall_mean": scores.get("mass_recall_mean"),
        "mass_recall_p5": scores.get("mass_recall_p5"),
        "oracle_ratio": scores.get("oracle_ratio"),
        "top1_agreement": scores.get("top1_agreement"),
        "next_token_kl": scores.get("next_token_kl"),
        "answer": answer,
        "expected": sample.answers,
        "correct": score_answer(answer, sample.answers) == 1.0,
        "needle_span": list(sample.needle_spans[0]),
        "needle_kept_fraction": recall.kept_fraction,
        "needle_layers": recall.layers_with_needle(),
        "pattern_bytes": sum(p.nbytes() for p in patterns),
        "forward_seconds": round(forward_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "peak_memory_gb": round(_peak_memory_gb(args.device), 3),
        "device": str(args.device),
        "plot": "needle_blocks.png",
    }
    print("[6/6] per-layer figures and the report", flush=True)
    summary.update(write_trace_report(
        args.out, summary, patterns=patterns, recall=recall, fidelity_layers=scores.get("layers", []),
        sample=sample, tokenizer=model.tokenizer, heatmap_layers=heatmap_layers,
    ))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: value for key, value in summary.items() if key != "per_layer"}, indent=2))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'report.html'}", flush=True)
    return summary


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
    """Peak GPU memory on CUDA, else the process's peak resident memory."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
