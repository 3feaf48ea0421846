"""The Gemma 3 270M section of docs/fidelity.md (issues 12 and 14), rendered by ``python -m benchmarks.fidelity render``.

Inputs: the JSON files of benchmarks/gpu_steps/s4_gemma3.txt, copied into benchmarks/results/:
- ``fidelity_e2e_<length>_gemma3_270m*.json`` (``python -m benchmarks.fidelity run --model ...``):
  recall, oracle ratio, KL and top-1 against dense attention;
- ``fidelity_at_length_gemma3_<length>*.json`` (``benchmarks/fidelity_at_length.py --model ...``):
  the same from one observe-mode and one sparse forward, KL / top-1 at evenly spaced positions, and
  the per-layer figures;
- ``fidelity_ruler_<length>_gemma3_270m*.json`` (``python -m benchmarks.fidelity ruler --model ...``):
  RULER accuracy dense against sparse.
A missing file leaves its table out; with none, no section. Every figure printed comes from them.
``python -m benchmarks.fidelity_render_gemma3 [RESULTS_DIR]`` prints the section alone.
"""

from __future__ import annotations

import json
from pathlib import Path

E2E, AT_LENGTH, RULER = "fidelity_e2e_*_gemma3_270m*.json", "fidelity_at_length_gemma3_*.json", "fidelity_ruler_*_gemma3_270m*.json"
INTRO = ("Gemma 3 270M (the Q4_K_M GGUF, dequantised to the dtype each table names; 18 layers x 4 query heads, 1 key-value head, d_head "
         "256; 15 layers with a 512-token sliding window, the global layers 5, 11 and 17; 262,144-token vocabulary). "
         "A layer whose window binds keeps its window band, exact, and runs no estimator: it prunes nothing and "
         "adds no rows to the recall figures, but counts in the pruned fraction, which is averaged over all 18 "
         "layers (the per-layer table gives the global layers' own). Input: the shipped essays after the "
         "tokenizer's BOS. Default selection (causal), sink 1, local 1.")


def is_gemma3(path: Path) -> bool:
    """A Gemma 3 result file (left out of the SmolLM2 sections)."""
    return "gemma3" in path.name


def _load_all(results: Path, pattern: str) -> list[dict]:
    return sorted((json.loads(path.read_text()) for path in results.glob(pattern)), key=lambda run: run.get("length", 0))


def _commands(runs: list[dict]) -> str:
    return "; ".join(f"`{command}`" for run in runs for command in run.get("commands", [run["command"]]))


def gemma3_section(results: Path) -> list[str]:
    """The section's markdown lines (empty without any input file)."""
    e2e, at_length, rulers = (_load_all(results, pattern) for pattern in (E2E, AT_LENGTH, RULER))
    if not (e2e or at_length or rulers):
        return []
    lines = ["## Gemma 3 270M (a real model of a new family, issues 12 and 14)", INTRO, ""]
    if e2e:
        lines += _end_to_end(e2e)
    if at_length:
        lines += _at_length(at_length)
    if rulers:
        lines += _ruler(rulers)
    return lines


def _end_to_end(runs: list[dict]) -> list[str]:
    lines = [f"**Against dense attention** ({runs[0]['date']}, {runs[0]['machine']}, {runs[0].get('dtype', 'float32')} "
             f"weights): {_commands(runs)}. KL and top-1 "
             "over every position where pruning happens.", "",
             "| tokens | config (estimator:block:top_k) | pruned (all layers) | recall mean | recall p5 | oracle ratio | "
             "KL (nats) | top-1 | positions |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            recall = (f"{r['mass_recall_mean']:.3f} | {r['mass_recall_p5']:.3f} | {r['oracle_ratio']:.3f}"
                      if "mass_recall_mean" in r else "- | - | -")  # --next-token-only rows have none
            lines.append(f"| {run['length']:,} | `{r['config']}` | {r['pruned_fraction']:.3f} | {recall} | "
                         f"{r['next_token_kl']:.4f} | {r['top1_agreement']:.3f} | {r['positions_scored']:,} |")
    return lines + [""]


def _at_length(runs: list[dict]) -> list[str]:
    first = runs[0]
    stream = first["stream"]
    lines = [f"**At length, one observe-mode and one sparse forward** ({first['date']}, {first['device']}, "
             f"{first['config']['dtype']} weights): "
             f"{_commands(runs)}. Default estimator `{stream['estimator']}`, {stream['query_block']}-token blocks, "
             f"top_k {stream['top_k']}; the oracle on every query block where pruning happens; KL and top-1 at the "
             "listed number of evenly spaced pruned positions.", "",
             "| tokens | pruned (all layers) | recall mean | recall p5 | oracle recall | oracle ratio | KL (nats) | top-1 | "
             "positions | seconds | peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            if "error" in r:
                lines.append(f"| {r['length']:,} | {r['error'][:80]} |" + " |" * 9)
                continue
            lines.append(f"| {r['length']:,} | {r['pruned_fraction']:.4f} | {r['mass_recall_mean']:.3f} | "
                         f"{r['mass_recall_p5']:.3f} | {r['oracle_recall_mean']:.3f} | {r['oracle_ratio']:.3f} | "
                         f"{r['next_token_kl']:.4f} | {r['top1_agreement']:.3f} | {r['positions_scored']:,} | "
                         f"{r['seconds']:.1f} | {r.get('peak_gpu_gb', float('nan')):.1f} |")
    for run in runs:
        for r in run["rows"]:
            layers = r.get("layers", [])
            pruning = [layer for layer in layers if layer["pruned_fraction"] > 0]
            if not pruning:
                continue
            rest = [layer["layer"] for layer in layers if layer["pruned_fraction"] == 0]
            lines += ["", f"Per layer at {r['length']:,} tokens, the layers that prune (the other {len(rest)}: "
                      f"pruned 0, recall 1):", "",
                      "| layer | pruned | recall mean | recall p5 | oracle recall | oracle ratio |", "|---|---|---|---|---|---|"]
            lines += [f"| {layer['layer']} | {layer['pruned_fraction']:.4f} | {layer['mass_recall_mean']:.3f} | "
                      f"{layer['mass_recall_p5']:.3f} | {layer['oracle_recall_mean']:.3f} | {layer['oracle_ratio']:.3f} |"
                      for layer in pruning]
    return lines + [""]


def _ruler(runs: list[dict]) -> list[str]:
    lines = [f"**RULER accuracy** ({runs[0]['date']}, {runs[0]['machine']}, {runs[0].get('dtype', 'float32')} weights): "
             f"{_commands(runs)}. Greedy answers of "
             "the model run densely and sparsely on the same seeded samples.", "",
             "| tokens | config | samples | dense accuracy | sparse accuracy | same output | needle heads | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            kept = "-" if r["needle_kept_share"] is None else f"{r['needle_kept_share']:.3f}"
            lines.append(f"| {run['length']:,} | `{r['config']}` | {r['samples']} | {r['dense_accuracy']:.3f} | "
                         f"{r['sparse_accuracy']:.3f} | {r['output_agreement']:.3f} | {r['needle_heads']} | {kept} |")
    return lines + [""]


if __name__ == "__main__":  # print the section alone (to paste into docs/fidelity.md without re-rendering it)
    import sys

    from benchmarks.fidelity_render import RESULTS

    print("\n".join(gemma3_section(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)))
