"""Attribution patching against exact head patching on an IOI prompt, default model (SmolLM2-135M).

    python benchmarks/attribution_ioi.py --out benchmarks/results/attribution_ioi.json

Exact: TransformerLens' ``get_act_patch_attn_head_out_all_pos`` (one forward per head: the
corrupted run with one head's clean ``hook_z`` patched in). Estimate: ``attribution_patching`` with
the roles swapped to the same direction (base run = corrupted prompt, patched value = clean), two
forwards and one backward for all heads. Reports Pearson and Spearman correlation over the
``[layer, head]`` grid and the overlap of the top-10 heads by |effect|. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PROMPTS = [  # (clean, corrupted, answer, wrong): the corrupted prompt names the other person second
    ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
]


def rank(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def main() -> None:
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    import sparse_lens as sl
    from sparse_lens.analysis.attribution_patching import attribution_patching

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attribution_ioi.json"))
    args = parser.parse_args()
    model = sl.HookedSparseTransformer.from_pretrained(sl.DEFAULT_MODEL)
    rows = []
    for clean_text, corrupted_text, answer, wrong in PROMPTS:
        clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupted_text)
        assert clean.shape == corrupted.shape, "prompts must tokenize to the same length"
        answer_id, wrong_id = model.to_single_token(answer), model.to_single_token(wrong)

        def metric(logits):
            return logits[0, -1, answer_id] - logits[0, -1, wrong_id]

        started = time.perf_counter()
        estimate = attribution_patching(model, corrupted, clean, metric, positions=[-1])
        estimate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad():
            corrupted_metric = float(metric(model(corrupted)))
            _, clean_cache = model.run_with_cache(clean)
            exact = get_act_patch_attn_head_out_all_pos(
                model, corrupted, clean_cache, lambda logits: metric(logits) - corrupted_metric)
        exact_seconds = time.perf_counter() - started
        a, b = estimate.head_out.double().flatten(), exact.double().flatten().cpu()
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        spearman = float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])
        top = lambda values: set(values.abs().topk(10).indices.tolist())  # noqa: E731
        rows.append({"prompt": clean_text, "clean_metric": estimate.corrupted_metric, "corrupted_metric": corrupted_metric,
                     "pearson": pearson, "spearman": spearman, "top10_overlap": len(top(a) & top(b)),
                     "estimate_seconds": estimate_seconds, "exact_seconds": exact_seconds,
                     "top_heads_estimate": estimate.top_heads(5),
                     "top_heads_exact": [(i // exact.shape[1], i % exact.shape[1], float(b[i]))
                                         for i in b.abs().topk(5).indices.tolist()]})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": sl.DEFAULT_MODEL, "rows": rows}, indent=2))
    print("| prompt | Pearson | Spearman | top-10 overlap | estimate s | exact s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['prompt'][:40]}... | {row['pearson']:.3f} | {row['spearman']:.3f} | {row['top10_overlap']}/10 | "
              f"{row['estimate_seconds']:.1f} | {row['exact_seconds']:.1f} |")


if __name__ == "__main__":
    main()
