"""Fidelity cost of strictly causal block selection (``StreamConfig.causal_selection``).

    python3 benchmarks/causal_selection.py --length 2048                       # CPU, ~minutes
    python3 benchmarks/causal_selection.py --length 8192 --model /path/model.gguf --out $OUT/causal_selection_8192_h200.json

For every ``estimator:block:top_k`` of ``--configs`` (query block = key block, sink 1, local 1) the
default model is traced once densely (observe mode) on ``--length`` tokens of the shipped prose,
then ``sl.fidelity`` runs with ``causal_selection=False`` (each query block chooses from all of
its queries) and ``True`` (lagged selection, ``sparse_lens.kernels.causal``): pruned fraction,
mass recall (mean, p5) of the kept blocks against the dense pattern, the exact top-k oracle's
ratio, next-token KL(dense || sparse) and top-1 agreement over every pruned position, and the
same at the last position. Prints a table and writes JSON (default
``benchmarks/results/causal_selection_<length>.json``).

Caveat written into the JSON: with ``causal_selection=False`` a position's logits were computed
with key blocks chosen partly from the queries after it, including the token it predicts, so its
per-position KL / top-1 are measured on logits that have seen the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
DEFAULT_CONFIGS = ["rescored:64:16", "stream:64:16", "rescored:16:16", "stream:16:16"]
FIGURES = ("pruned_fraction", "mass_recall_mean", "mass_recall_p5", "oracle_ratio", "next_token_kl",
           "top1_agreement", "final_kl", "final_top1", "estimate_seconds")
CAVEAT = ("causal_selection=False rows: each query block's key blocks were chosen from all of its queries, so a "
          "position's logits depend on later tokens, including the one it predicts; their per-position next_token_kl "
          "and top1_agreement are measured on logits that have seen the token they predict.")


def stream_config(text: str, causal: bool):
    """``estimator:block:top_k`` -> StreamConfig (query block = key block, sink 1, local 1)."""
    import sparse_lens as sl

    name, block, top_k = text.split(":")
    return sl.StreamConfig(query_block=int(block), key_block=int(block), top_k=int(top_k), sink_blocks=1,
                           local_blocks=1, estimator=name, keep_qk=False, causal_selection=causal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="estimator:block:top_k")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--model", default=None, help="default: sl.DEFAULT_MODEL (or a path to the GGUF file)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/causal_selection_<length>.json")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.common, sparse_lens
    import torch

    import sparse_lens as sl
    from benchmarks.common import text_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or RESULTS / f"causal_selection_{args.length}.json"
    model = sl.HookedSparseTransformer.from_pretrained(args.model or sl.DEFAULT_MODEL, device=device)
    # after the tokenizer's BOS where it adds one (Gemma), as the model reads a text; SmolLM2: the same ids
    tokens = torch.tensor([text_tokens(model.tokenizer, args.length)], device=device)
    started = time.perf_counter()
    dense = sl.collect_dense(model, tokens)
    print(f"dense observe run: {time.perf_counter() - started:.1f} s", flush=True)
    results = {
        "date": str(date.today()), "length": args.length, "model": args.model or sl.DEFAULT_MODEL,
        "machine": torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "torch_threads": torch.get_num_threads(), "command": "python3 benchmarks/causal_selection.py " + " ".join(sys.argv[1:]),
        "caveat": CAVEAT, "rows": [],
    }
    for text in args.configs:
        for causal in (False, True):
            stream = stream_config(text, causal)
            started = time.perf_counter()
            report = sl.fidelity(model, tokens, stream, dense=dense, verbose=True)
            row = {"config": text, "causal_selection": causal, **stream.to_dict(), **report,
                   "seconds": time.perf_counter() - started}
            results["rows"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            print(json.dumps({name: row[name] for name in ("config", "causal_selection", *FIGURES)}), flush=True)
    print_table(results)
    print(f"\nwritten: {out}")


def print_table(results: dict) -> None:
    print(f"\n{results['length']} tokens of prose, sink 1, local 1, {results['machine']}\n")
    print("| estimator | block | top_k | causal | pruned | recall mean | recall p5 | oracle ratio | KL (nats) | top-1 "
          "| final KL | est. s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['estimator']} | {r['query_block']} | {r['top_k']} | {'yes' if r['causal_selection'] else 'no'} | "
              f"{r['pruned_fraction']:.3f} | {r['mass_recall_mean']:.3f} | {r['mass_recall_p5']:.3f} | "
              f"{r['oracle_ratio']:.3f} | {r['next_token_kl']:.4f} | {r['top1_agreement']:.3f} | {r['final_kl']:.4f} | "
              f"{r['estimate_seconds']:.1f} |")
    print(f"\n{results['caveat']}")


if __name__ == "__main__":
    main()
