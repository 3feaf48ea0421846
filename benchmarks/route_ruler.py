"""Needle-to-output route on one RULER sample with the default model and StreamConfig (CPU).

    python -m benchmarks.route_ruler --length 8192 --task niah_single_1

One sparse forward with every layer's hook_pattern cached (its last position gives the first
answer token), then ``route_to_needle``: the exact heaviest kept-edge path from the answer position
back to the input, and per layer the best route first entering the needle there, through which
heads (scores: log-mass). Prints the route summary and writes
benchmarks/results/route_<task>_<length>.json and docs/img/route_<task>_<length>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparse_lens as sl  # noqa: E402
from sparse_lens.analysis.routes import route_to_needle  # noqa: E402
from sparse_lens.data.ruler import make_sample  # noqa: E402
from sparse_lens.plots.routes import plot_route  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer budget kept free in the length")
    args = parser.parse_args()
    model = sl.HookedSparseTransformer.from_pretrained(sl.DEFAULT_MODEL)
    stream = model.stream.replace(keep_qk=False)
    sample = make_sample(args.task, model.tokenizer, args.length, seed=args.seed, answer_tokens=args.max_new_tokens)
    tokens = torch.tensor([sample.input_ids])
    started = time.perf_counter()
    with torch.no_grad(), model.stream_settings(**stream.to_dict()):
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    forward_seconds = time.perf_counter() - started
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
    started = time.perf_counter()
    route = route_to_needle(patterns, sample.needle_spans[0], answer_position=-1)
    route_seconds = time.perf_counter() - started
    first_token = model.tokenizer.decode([int(logits[0, -1].argmax())])
    entry = route.best_entry
    steps = [{"layer": step.layer, "query_block": step.query_block, "key_block": step.key_block, "mass": step.mass,
              "heads": [list(h) for h in step.heads], "needle": step.needle} for step in (entry.steps if entry else [])]
    result = {
        "date": str(date.today()), "task": args.task, "length": len(sample.input_ids), "needle_span": list(sample.needle_spans[0]),
        "stream": stream.to_dict(), "forward_seconds": forward_seconds, "route_seconds": route_seconds,
        "answers": list(sample.answers),
        "first_answer_token": first_token, "entry_layers": route.entry_layers(),
        "best_entry_layer": entry.entry_layer if entry else None,
        "best_entry_log_mass": entry.log_score if entry else None,
        "best_log_mass": route.best.log_score if route.best else None,
        "best_entry_steps": steps, "summary": route.summary(),
        "command": "python -m benchmarks.route_ruler " + " ".join(os.sys.argv[1:]),
    }
    name = f"route_{args.task}_{args.length}"
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot_route(route, ROOT / "docs" / "img" / f"{name}.png", title=f"{args.task}, {len(sample.input_ids)} tokens")
    print(route.summary())
    print(f"first answer token {first_token!r} (expected {sample.answers}), sparse forward {forward_seconds:.0f} s")


if __name__ == "__main__":
    main()
