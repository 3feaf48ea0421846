"""Fidelity and cost of Stream sparse tracing on the default model (CPU), against the dense bridge.

    python benchmarks/fidelity_smollm2.py --length 8192 --top-k 4 8 16 --out benchmarks/results/fidelity_smollm2_8k.json

Each row runs in its own process so that its peak resident memory is its own:
- ``dense``: TransformerLens' dense bridge, one forward (HF eager attention, T x T patterns);
- ``sparse K``: HookedSparseTransformer forward with every layer's hook_pattern cached;
- ``fidelity``: sl.fidelity for every K on one shared dense (observe-mode) run.
Input: the first ``--length`` tokens of the shipped essays (original prose, CC0).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load(top_k: int | None, block: int):
    import torch

    import sparse_lens as sl
    from sparse_lens.data import prose_tokens
    from sparse_lens.tl.loading import load_hf_model, resolve_model_source

    hf_model, tokenizer = load_hf_model(resolve_model_source(sl.DEFAULT_MODEL))
    return hf_model, tokenizer, torch, sl, prose_tokens


def run_phase(args: argparse.Namespace) -> dict:
    hf_model, tokenizer, torch, sl, prose_tokens = load(None, args.block)
    tokens = torch.tensor([prose_tokens(tokenizer, args.length)])
    baseline_gb = peak_rss_gb()
    if args.phase == "dense":
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        model = build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=hf_model.config, tokenizer=tokenizer)
        started = time.perf_counter()
        with torch.no_grad():
            model(tokens)
        return {"row": "dense bridge forward", "seconds": time.perf_counter() - started,
                "peak_rss_gb": peak_rss_gb(), "after_load_gb": baseline_gb}
    stream = sl.StreamConfig(query_block=args.block, key_block=args.block, top_k=args.phase_top_k or 16, keep_qk=False)
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, tokenizer, stream)
    if args.phase == "sparse":
        started = time.perf_counter()
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        seconds = time.perf_counter() - started
        patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
        return {"row": f"sparse forward top_k={args.phase_top_k}", "seconds": seconds, "peak_rss_gb": peak_rss_gb(),
                "after_load_gb": baseline_gb, "pattern_bytes": sum(p.nbytes() for p in patterns),
                "pruned_fraction": sum(p.pruned_fraction() for p in patterns) / len(patterns)}
    started = time.perf_counter()
    dense = sl.collect_dense(model, tokens)
    dense_seconds = time.perf_counter() - started
    reports = []
    for top_k in args.top_k:
        started = time.perf_counter()
        report = sl.fidelity(model, tokens, stream.replace(top_k=top_k), dense=dense)
        reports.append({"top_k": top_k, "seconds": time.perf_counter() - started, **report})
        print(json.dumps(reports[-1]), flush=True)
    return {"row": "fidelity", "dense_observe_seconds": dense_seconds, "peak_rss_gb": peak_rss_gb(), "reports": reports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity_smollm2.json"))
    parser.add_argument("--phase", choices=["dense", "sparse", "fidelity"], help=argparse.SUPPRESS)
    parser.add_argument("--phase-top-k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(run_phase(args)), flush=True)
        return
    rows = []
    phases = [["--phase", "dense"]] + [["--phase", "sparse", "--phase-top-k", str(k)] for k in args.top_k]
    phases.append(["--phase", "fidelity"])
    for phase in phases:
        command = [sys.executable, __file__, "--length", str(args.length), "--block", str(args.block),
                   "--top-k", *map(str, args.top_k), *phase]
        print("running", " ".join(phase), flush=True)
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.split("RESULT ", 1)[1]))
        print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores (no GPU)",
              "length": args.length, "block": args.block, "rows": rows,
              "command": "python benchmarks/fidelity_smollm2.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)


def print_table(result: dict) -> None:
    by_k = {r["top_k"]: r for r in result["rows"][-1]["reports"]}
    timing = {r["row"]: r for r in result["rows"][:-1]}
    print(f"\nSmolLM2-135M, {result['length']} tokens of prose, {result['block']}-token blocks, CPU")
    print("| run | pruned | recall mean | recall p5 | oracle ratio | KL | top-1 | forward s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense = timing["dense bridge forward"]
    print(f"| dense bridge | 0 | 1 | 1 | 1 | 0 | 1 | {dense['seconds']:.1f} | {dense['peak_rss_gb']:.2f} |")
    for top_k, report in by_k.items():
        sparse = timing[f"sparse forward top_k={top_k}"]
        print(f"| top_k={top_k} | {report['pruned_fraction']:.3f} | {report['mass_recall_mean']:.3f} | "
              f"{report['mass_recall_p5']:.3f} | {report['oracle_ratio']:.3f} | {report['next_token_kl']:.4f} | "
              f"{report['top1_agreement']:.3f} | {sparse['seconds']:.1f} | {sparse['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
