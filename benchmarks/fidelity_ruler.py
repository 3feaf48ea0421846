"""``python -m benchmarks.fidelity ruler``: RULER accuracy dense against sparse, and needle recall.

For every configuration of ``--configs`` (``estimator:block:top_k[:field=value...]``): the same
seeded RULER samples (``--samples`` per task, at ``--length`` tokens) answered greedily by the
model with dense attention and with the sparse configuration (``sl.ruler_accuracy``), each with
needle fidelity at the answer position (in which (layer, head) dense attention puts >= 10% of its
mass on a needle, and whether the estimator keeps that needle's block). The per-head table of the
first sample under the first configuration is kept for the figure. Writes
benchmarks/results/fidelity_ruler_<length>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import torch

from benchmarks.common import RESULTS, machine, parse_config


def run_ruler(args: argparse.Namespace) -> dict:
    import sparse_lens as sl
    from sparse_lens.analysis import needle_fidelity, ruler_accuracy, ruler_samples
    from sparse_lens.analysis.task_accuracy import DEFAULT_TASKS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = sl.HookedSparseTransformer.from_pretrained(args.model or sl.DEFAULT_MODEL, device=device,
                                                       dtype=getattr(torch, args.dtype))
    samples = ruler_samples(model.tokenizer, args.length, args.tasks or DEFAULT_TASKS, args.samples,
                            answer_tokens=args.max_new_tokens)
    results = {"date": str(date.today()), "machine": torch.cuda.get_device_name() if device == "cuda" else machine(),
               "model": args.model or sl.DEFAULT_MODEL, "dtype": args.dtype, "length": args.length, "samples_per_task": args.samples, "tasks": list(args.tasks or DEFAULT_TASKS),
               "threshold": 0.1, "max_new_tokens": args.max_new_tokens,
               "command": "python -m benchmarks.fidelity ruler " + " ".join(args.argv), "rows": []}
    out = RESULTS / f"fidelity_ruler_{args.length}{args.suffix}.json"
    if out.exists():  # rows (and the head table) of configurations measured before are kept
        before = json.loads(out.read_text())
        results["rows"] = [row for row in before["rows"] if row["config"] not in args.configs]
        results["commands"] = before.get("commands", [before["command"]]) + [results["command"]]
        if "needle_head_table" in before:
            results["needle_head_table"] = before["needle_head_table"]
    for text in args.configs:
        stream = parse_config(text)
        started = time.perf_counter()
        accuracy = ruler_accuracy(model, samples, stream, max_new_tokens=args.max_new_tokens, needles=True)
        needles = [record.needle for record in accuracy.records]
        needle_heads = sum(n["needle_heads"] for n in needles)
        missed = sum(n["missed_heads"] for n in needles)
        results["rows"].append({
            "config": text, "samples": len(samples), "dense_accuracy": accuracy.dense_accuracy,
            "sparse_accuracy": accuracy.sparse_accuracy, "output_agreement": accuracy.output_agreement,
            "per_task": accuracy.per_task(), "needle_heads": needle_heads, "missed_heads": missed,
            "needle_kept_share": None if needle_heads == 0 else 1 - missed / needle_heads,
            "seconds": time.perf_counter() - started, "records": accuracy.to_dict()["records"],
        })
        if "needle_head_table" not in results:
            task, sample = samples[0]
            table = needle_fidelity(model, sample, stream=stream)
            results["needle_head_table"] = {
                "dense_mass": table.needle_mass[0].tolist(), "kept": table.kept[0].tolist(),
                "title": f"{task}, {sample.length} tokens, {text}: dense mass on the needle",
            }
        out.write_text(json.dumps(results, indent=2))
        row = results["rows"][-1]
        print(f"{text}: dense {row['dense_accuracy']:.3f} sparse {row['sparse_accuracy']:.3f} "
              f"same output {row['output_agreement']:.3f} needle heads {needle_heads} missed {missed} "
              f"({row['seconds']:.0f} s)", flush=True)
    return results
