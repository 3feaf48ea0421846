"""Fidelity of sparse tracing on the default model (CPU), and the page that reports it.

    python -m benchmarks.fidelity run --length 8192 --dense-cache /tmp/dense8k.pt     # end to end
    python -m benchmarks.fidelity ruler --length 4096 --samples 3                       # task accuracy
    python -m benchmarks.fidelity render                                                # docs/fidelity.md

``run``: per length of ``--length`` (one or more; the model loads once), one dense
(observe-mode) trace of that many tokens of the shipped prose (after the tokenizer's BOS where it
adds one: Gemma; SmolLM2 adds none), then
``sl.fidelity`` for every configuration of ``--configs`` (estimator:block:top_k, or
adaptive:block:cap:p): pruned fraction, mass recall (mean, p5, per layer), the exact top-k
oracle's recall and the ratio, estimator time, and next-token KL / top-1 of the model run
sparsely against the dense run over every pruned position. Writes
benchmarks/results/fidelity_e2e_<length><suffix>.json after every configuration. The exact oracle
of a (layer, budget) is computed once per length and reused by every configuration of that budget
(``sparse_lens.analysis.fidelity_oracle.OracleCache``; ``--no-oracle-cache``: once per
configuration, same figures), so a row's ``seconds`` is its own scoring plus the oracle passes it
was the first to need. ``--model``: any
model ``from_pretrained`` takes (e.g. Gemma 3 270M: a .gguf path or a gguf_to_dir.py directory).

``ruler``: RULER NIAH samples (``sparse_lens.data.ruler``) at ``--length``: greedy answers of the
model run densely and sparsely (``sl.ruler_accuracy``), and needle recall at the answer position
(``sl.needle_fidelity``: in which heads the estimator keeps the needle block where dense
attention puts >= 10% of its mass on the needle). Writes benchmarks/results/fidelity_ruler_<length>.json.

``render``: docs/fidelity.md and its figures (docs/img/fidelity_*.png) from the JSON files above
and from benchmarks/estimators.py's comparison (benchmarks/results/estimators_smollm2_8192*.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

from benchmarks.common import RESULTS, machine, parse_config, text_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPE_HELP = ("the weights' torch dtype (GGUF weights are dequantised to it); bfloat16 for d_head 256 at 64-token "
              "blocks on the GPU, whose fp32 Triton tiles exceed the H200's shared memory")
DEFAULT_CONFIGS = [
    "rescored:16:16", "stream:16:16",  # 94% pruned at 8k
    "adaptive:16:128:top_p=0.93",  # adaptive budget (cap 128 blocks), ~90% pruned
    "rescored:64:16", "stream:64:16",  # the StreamConfig default budget (77% pruned at 8k)
]


def load_dense(model, tokens, cache: Path | None):
    """``sl.collect_dense`` once; with a cache path the trace is saved there (every ``DenseTrace``
    field: the layers' window / softcap / sinks and the model's fingerprint too) and reused when it
    was made from these tokens with this model (else made again and saved over it)."""
    return load_dense_timed(model, tokens, cache)[0]


def load_dense_timed(model, tokens, cache: Path | None):
    """:func:`load_dense`, and the seconds the dense run took (when it was made; a reloaded
    trace: those saved with it)."""
    import dataclasses

    import torch

    import sparse_lens as sl
    from sparse_lens.analysis.dense_trace import DenseTrace, model_fingerprint

    names = [field.name for field in dataclasses.fields(DenseTrace)]
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        # A cache without the fingerprint (older files) kept no window / softcap / sinks either:
        # figures of a windowed or capped model would be computed without them, so it is made again.
        if torch.equal(saved["tokens"], tokens.cpu()) and saved.get("model") == model_fingerprint(model):
            print(f"dense trace loaded from {cache}", flush=True)
            return DenseTrace(**{name: saved[name] for name in names}), saved["seconds"]
    started = time.perf_counter()
    dense = sl.collect_dense(model, tokens)
    seconds = time.perf_counter() - started
    print(f"dense observe run: {seconds:.1f} s", flush=True)
    if cache is not None:
        torch.save({**{name: getattr(dense, name) for name in names}, "seconds": seconds}, cache)
    return dense, seconds


def run_end_to_end(args: argparse.Namespace) -> None:
    """``run``: the model loaded once, then every length of ``--length`` in turn."""
    import torch

    import sparse_lens as sl

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = sl.HookedSparseTransformer.from_pretrained(args.model or sl.DEFAULT_MODEL, device=device,
                                                       dtype=getattr(torch, args.dtype))
    for length in args.length:
        run_length(args, model, length)


def run_length(args: argparse.Namespace, model, length: int) -> None:
    """One length: its first ``length`` tokens of the shipped prose (after the tokenizer's BOS, for
    tokenizers that add one), every configuration, benchmarks/results/fidelity_e2e_<length><suffix>.json."""
    import torch

    import sparse_lens as sl
    from sparse_lens.analysis.fidelity_oracle import OracleCache

    device = str(model.cfg.device)
    model_name = args.model or sl.DEFAULT_MODEL
    tokens = torch.tensor([text_tokens(model.tokenizer, length)], device=device)
    dense = None if args.next_token_only else load_dense(model, tokens, args.dense_cache)
    out = RESULTS / f"fidelity_e2e_{length}{args.suffix}.json"
    results = json.loads(out.read_text()) if out.exists() and args.append else {"rows": []}
    command = "python -m benchmarks.fidelity run " + " ".join(args.argv)
    results["commands"] = results.get("commands", []) + [command]
    results.update(date=str(date.today()), length=length, model=model_name, dtype=args.dtype,
                   machine=torch.cuda.get_device_name() if device.startswith("cuda") else machine(),
                   torch_threads=torch.get_num_threads(),
                   command=command)
    if args.next_token_only:
        run_next_token_only(args, model, tokens, results, out)
        return
    # The exact oracle of each (layer, budget) is computed once on this trace, not once per config.
    oracle_cache = None if args.no_oracle_cache else OracleCache(dense)
    for text in args.configs:
        stream = parse_config(text)
        started = time.perf_counter()
        report = sl.fidelity(model, tokens, stream, dense=dense, per_layer=True, verbose=True,
                             oracle_stride=args.oracle_stride, oracle_cache=oracle_cache)
        row = {"config": text, **stream.to_dict(), **report, "seconds": time.perf_counter() - started}
        results["rows"] = [r for r in results["rows"] if r["config"] != text] + [row]
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    print_end_to_end(results)


def run_next_token_only(args: argparse.Namespace, model, tokens, results: dict, out: Path) -> None:
    """``--next-token-only``: one dense forward (``mode="dense"``, torch SDPA), then per config one
    sparse forward against its logits.

    KL, top-1 (over the pruned positions, as ``sl.fidelity``) and the pruned fraction (from each
    layer's cached pattern); no recall figures, so none of ``sl.fidelity``'s per-layer estimate and
    oracle passes on the dense q, k: for estimators that cost a dense pass per layer (``oracle``).
    """
    import numpy as np
    import torch

    from sparse_lens.analysis.fidelity_metrics import first_pruned_position, next_token_figures

    started = time.perf_counter()
    with torch.no_grad(), model.stream_settings(mode="dense"):
        dense_logits = model(tokens).float()
    print(f"dense forward: {time.perf_counter() - started:.1f} s", flush=True)
    for text in args.configs:
        stream = parse_config(text)
        started = time.perf_counter()
        with torch.no_grad(), model.stream_settings(**{**stream.to_dict(), "mode": "sparse", "keep_qk": False}):
            logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        pruned = float(np.mean([cache[name].pruned_fraction() for name in cache.keys()]))
        first = first_pruned_position(stream, tokens.shape[-1])
        row = {"config": text, **stream.to_dict(), "seq_len": tokens.shape[-1], "pruned_fraction": pruned,
               **next_token_figures(dense_logits, logits.float(), first_position=first),
               "seconds": time.perf_counter() - started, "next_token_only": True}
        results["rows"] = [r for r in results["rows"] if r["config"] != text] + [row]
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)


def print_end_to_end(results: dict) -> None:
    print(f"\n{results['length']} tokens of prose, sink 1, local 1, {results['machine']}\n")
    print("| estimator | block | top_k | pruned | recall mean | recall p5 | oracle ratio | KL (nats) | top-1 | est. s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        budget = f"{r['top_k']} (p {r['top_p']})" if r["estimator"] == "adaptive" else str(r["top_k"])
        print(f"| {r['estimator']} | {r['query_block']} | {budget} | {r['pruned_fraction']:.3f} | "
              f"{r['mass_recall_mean']:.3f} | {r['mass_recall_p5']:.3f} | {r['oracle_ratio']:.3f} | "
              f"{r['next_token_kl']:.4f} | {r['top1_agreement']:.3f} | {r['estimate_seconds']:.0f} |")


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="end-to-end fidelity of several configurations on one dense trace")
    run.add_argument("--length", type=int, nargs="+", default=[8192],
                     help="tokens (one or more lengths, one JSON file each; the model loads once)")
    run.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    run.add_argument("--dense-cache", type=Path, default=None)
    run.add_argument("--append", action="store_true", help="keep rows of other configs already in the JSON")
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--model", default=None, help="default: sl.DEFAULT_MODEL (a GGUF path on machines without the package)")
    run.add_argument("--suffix", default="", help="added to the JSON name (e.g. _h200)")
    run.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    run.add_argument("--next-token-only", action="store_true",
                     help="KL, top-1 and pruned fraction only (one sparse forward per config, no recall figures)")
    run.add_argument("--oracle-stride", type=int, default=1,
                     help="the exact oracle on every n-th pruned query block (sl.fidelity's oracle_stride; CPU time)")
    run.add_argument("--no-oracle-cache", action="store_true",
                     help="recompute the exact oracle for every config (by default once per layer and budget)")
    ruler = commands.add_parser("ruler", help="RULER accuracy, dense against sparse, and needle recall")
    ruler.add_argument("--length", type=int, default=4096)
    ruler.add_argument("--samples", type=int, default=3, help="samples per task")
    ruler.add_argument("--tasks", nargs="+", default=None)
    ruler.add_argument("--configs", nargs="+", default=["rescored:16:16", "stream:16:16"])
    ruler.add_argument("--max-new-tokens", type=int, default=32)
    ruler.add_argument("--model", default=None, help="default: sl.DEFAULT_MODEL")
    ruler.add_argument("--suffix", default="", help="added to the JSON name (e.g. _h200)")
    ruler.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    commands.add_parser("render", help="write docs/fidelity.md and its figures from the JSON results")
    args = parser.parse_args()
    args.argv = sys.argv[2:]
    if args.command == "run":
        run_end_to_end(args)
    elif args.command == "ruler":
        from benchmarks.fidelity_ruler import run_ruler

        run_ruler(args)
    else:
        from benchmarks.fidelity_render import render

        render()


if __name__ == "__main__":
    main()
