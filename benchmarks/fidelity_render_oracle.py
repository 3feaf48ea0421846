"""Two issue-11 sections of docs/fidelity.md, rendered by ``python -m benchmarks.fidelity render``.

- :func:`oracle_section`: the default against the model run on the oracle's own blocks
  (``estimator="oracle"``, benchmarks/results/fidelity_e2e_8192_oracle.json, ``fidelity run
  --next-token-only``), the ceiling of the KL and top-1 targets;
- :func:`representative_keys_section`: the wide search's beam and representative keys
  (benchmarks/results/fidelity_e2e_8192_rk.json);
- :func:`causal_oracle_section`: the default against the oracle's own blocks, both with the default
  causal selection (benchmarks/results/fidelity_e2e_8192_oracle_causal.json beside the rk file's
  default rows).
Every figure printed comes from those files and from the end-to-end rows the summary shows; the
H200 costs quoted in the prose are docs/benchmarks.md's.
"""

from __future__ import annotations

import math


def _label(row: dict) -> str:
    return f"{row['query_block']}-token blocks, top_k {row['top_k']}"


def _listed(items) -> str:
    """``a, b and c``."""
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _later_command(first: str, later: str) -> str:
    """``later`` as the options ``first`` lacks, then its ``--configs``."""
    options, configs = later.split(" --configs ")
    first_options = first.split(" --configs ")[0].split()
    return " ".join([word for word in options.split() if word not in first_options] + ["--configs", configs])


def _oracle_of(row: dict, oracles: list[dict]) -> dict | None:
    """The oracle row at ``row``'s fixed budget; for an adaptive row, the fixed ``top_k`` of its block
    size that prunes nearest to it."""
    same_block = [o for o in oracles if o["query_block"] == row["query_block"]]
    if row["estimator"] != "adaptive":
        return next((o for o in same_block if o["top_k"] == row["top_k"]), None)
    return min(same_block, key=lambda o: abs(o["pruned_fraction"] - row["pruned_fraction"]), default=None)


def oracle_section(rows: dict, run: dict) -> list[str]:
    """``rows``: the summary's end-to-end rows by config; ``run``: the oracle file."""
    oracles = [r for r in run["rows"] if r["estimator"] == "oracle"]
    check = next((r for r in run["rows"] if r["estimator"] != "oracle"), None)
    fixed = [rows[c] for c in ("rescored:64:16", "rescored:64:4", "rescored:16:16", "rescored:32:8") if c in rows]
    adaptive = sorted((r for r in rows.values() if r["estimator"] == "adaptive" and "oracle_ratio" in r),
                      key=lambda r: r["top_p"])
    pairs = [(r, _oracle_of(r, oracles)) for r in fixed + adaptive]
    pairs = [(r, o) for r, o in pairs if o is not None and (r["estimator"] != "adaptive" or r["top_p"] >= 0.92)]
    commands = run.get("commands", [run["command"]])
    lines = [
        "### The oracle's own blocks at the same budget (issue #11)",
        "The ceiling of the KL and top-1 targets: the model run with `estimator=\"oracle\"` "
        "(`sparse_lens/kernels/oracle_estimate.py`: per layer, head and query block the sink and local blocks, as every "
        "estimator keeps them, plus the key blocks of largest exact dense block mass; each layer selects on its own sparse "
        "inputs, like the rows above, and with the same old non-causal selection, `causal_selection=False`). No estimator "
        "with the same sink and local blocks and the same `top_k` can keep more dense mass per row, so its recall is the "
        "most any row can have at this budget (at most the exact top-k \"oracle\" recall of the tables below: "
        + _listed(f"{r['oracle_recall_mean']:.3f}" for r, _ in pairs if r["estimator"] != "adaptive") + " at "
        + _listed(f"{r['query_block']}:{r['top_k']}" for r, _ in pairs if r["estimator"] != "adaptive")
        + "). It is not a strict ceiling of KL and top-1 (more mass per layer need not mean a closer output; the default "
        "matches it at 64:16), nor of a budget that varies per row: the adaptive rows are set beside the oracle at the "
        "fixed `top_k` that prunes as much on average.",
        "Commands: `" + commands[0] + "`"
        + "".join(f", then the same with `{_later_command(commands[0], c)}`" for c in commands[1:])
        + f" ({run['date']}, {run['machine']}; benchmarks/results/fidelity_e2e_8192_oracle.json). Same "
        f"{run['length']:,} tokens of the shipped essays, sink 1, local 1. `--next-token-only`: KL and top-1 of one "
        "sparse forward against one dense forward (`mode=\"dense\"`) over the same positions as the rows above (every "
        "position where pruning happens); the recall figures are not re-measured (CPU time)."
        + (f" Check of that path: its `{check['config'].split(':causal')[0]}` row gives the figures of the table above "
           f"(pruned {check['pruned_fraction']:.3f}, KL {check['next_token_kl']:.4f}, top-1 {check['top1_agreement']:.3f})."
           if check else "")
        + " The default's figures are the rows above.",
        "",
        "| budget | pruned | default | KL default / oracle | ratio | top-1 default / oracle | ratio | within 10% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    deviations = []
    for r, o in pairs:
        kl_ratio, top1_ratio = r["next_token_kl"] / o["next_token_kl"], r["top1_agreement"] / o["top1_agreement"]
        if r["estimator"] != "adaptive":
            deviations += [abs(kl_ratio - 1), abs(top1_ratio - 1)]
        within = "yes" if kl_ratio <= 1.1 and top1_ratio >= 0.9 else "no"
        if r["pruned_fraction"] < 0.90:
            within += " (below 90% pruned: no target)"
        budget = (_label(r) if r["estimator"] != "adaptive" else
                  f"{r['query_block']}-token blocks, cap {r['top_k']}, p {r['top_p']} (oracle: top_k {o['top_k']}, "
                  f"{o['pruned_fraction']:.3f} pruned)")
        lines.append(f"| {budget} | {r['pruned_fraction']:.3f} | `{r['config']}` | {r['next_token_kl']:.4f} / "
                     f"{o['next_token_kl']:.4f} | {kl_ratio:.2f} | {r['top1_agreement']:.3f} / {o['top1_agreement']:.3f} | "
                     f"{top1_ratio:.3f} | {within} |")
    pruned_90 = [(r, o) for r, o in pairs if r["estimator"] != "adaptive" and r["pruned_fraction"] >= 0.90]
    tight = next(((r, o) for r, o in pairs if r["estimator"] == "adaptive" and r["pruned_fraction"] >= 0.90), None)
    ratios = [r["oracle_ratio"] for r, _ in pairs if r["estimator"] != "adaptive"]
    lines += ["", f"At every fixed budget the default's end-to-end figures are within {math.ceil(100 * max(deviations))}% "
              f"of the oracle's blocks: the remaining recall gap (oracle ratio {min(ratios):.3f}-{max(ratios):.3f}) costs "
              "almost no KL or top-1. The issue #5 target (top-1 >= 0.99, KL <= 0.02 at >= 90% pruned) is beyond even the "
              "oracle's blocks at these budgets (top-1 " + " and ".join(f"{o['top1_agreement']:.3f}" for _, o in pruned_90)
              + ")" + (f", and the adaptive budget already beats the fixed-`top_k` oracle that prunes as much (KL "
                       f"{tight[0]['next_token_kl']:.4f} against {tight[1]['next_token_kl']:.4f}, top-1 "
                       f"{tight[0]['top1_agreement']:.3f} against {tight[1]['top1_agreement']:.3f} at "
                       f"~{tight[0]['pruned_fraction']:.3f} pruned)" if tight else "")
              + ": closing the target needs a budget spread by need (per row, head or layer) or more budget, not a closer "
              "estimate of the top-k.", ""]
    return lines


def representative_keys_section(run: dict, wider: dict | None = None, costs: dict | None = None) -> list[str]:
    """The wide search's beam and representative keys, from fidelity_e2e_8192_rk.json, with the
    wider beams of fidelity_e2e_8192_beam.json (``wider``) where that run exists and their H200 cost
    from ``costs`` (benchmarks/rescore.py's JSON) where that exists."""
    extra = wider["rows"] if wider else []
    rows = sorted(run["rows"] + extra, key=lambda r: (r["query_block"], -r["top_k"], -r["beam"], -r["representative_keys"]))
    default = {(r["query_block"], r["top_k"]): r for r in rows if r["config"].count(":") == 2}  # no settings given
    d_beam, d_keys = next(iter(default.values()))["beam"], next(iter(default.values()))["representative_keys"]

    def bold(value, default_value):
        return f"**{value}**" if value == default_value else str(value)

    def pick(block, top_k, beam, keys):
        return next(r for r in rows if (r["query_block"], r["top_k"], r["beam"], r["representative_keys"]) == (block, top_k, beam, keys))

    lines = [
        "## The wide search's width and representative keys (issue #11)",
        "The default's cost is mostly Stream's wide search (docs/benchmarks.md, eighth session: 6.2 of 10.6 ms at 128k, 80 of",
        f"124 ms at 1M on the H200), which scores each candidate by `representative_keys` ({d_keys}) keys of its centre block and",
        f"keeps `beam` ({d_beam}) times the branches. Fewer keys or a narrower search are cheaper; these rows say what they lose.",
        "Commands: " + "; ".join(f"`{c}`" for c in run.get("commands", [run["command"]]))
        + f" ({run['date']}, {run['machine']}; benchmarks/results/fidelity_e2e_8192_rk.json)"
        + ("".join(f"; `{c}`" for c in wider.get("commands", [wider["command"]]))
           + f" ({wider['date']}, {wider['machine']}; benchmarks/results/fidelity_e2e_8192_beam.json)" if wider else "")
        + f". The first {run['length']:,}",
        "tokens of the shipped essays, the default (causal) selection, sink 1, local 1; the default settings in bold.",
        "",
        "| budget | beam | representative keys | pruned | recall mean | recall p5 | oracle ratio | KL (nats) | top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        is_default = (r["beam"], r["representative_keys"]) == (d_beam, d_keys)
        lines.append(f"| {_label(r)} | {bold(r['beam'], d_beam) if is_default else r['beam']} | "
                     f"{bold(r['representative_keys'], d_keys) if is_default else r['representative_keys']} | "
                     f"{r['pruned_fraction']:.3f} | {r['mass_recall_mean']:.3f} | {r['mass_recall_p5']:.3f} | "
                     f"{r['oracle_ratio']:.3f} | {r['next_token_kl']:.4f} | {r['top1_agreement']:.3f} |")
    fewer_4 = [r for r in rows if (r["query_block"], r["top_k"], r["beam"]) == (64, 4, d_beam) and r["representative_keys"] < d_keys]
    fewer_16 = [r for r in rows if (r["query_block"], r["top_k"], r["beam"]) == (64, 16, d_beam) and r["representative_keys"] < d_keys]
    d64_4, d64_16, d16 = default[(64, 4)], default[(64, 16)], default[(16, 16)]
    keys16 = {r["representative_keys"]: r for r in rows if (r["query_block"], r["beam"]) == (16, d_beam)}
    narrow_64, narrow_16 = pick(64, 4, 2, 4), pick(16, 16, 2, 4)
    kl_growth = max(r["next_token_kl"] for r in fewer_4) / d64_4["next_token_kl"] - 1
    ratios = [r["oracle_ratio"] for r in default.values()]

    def span(group):
        low, high = min(r["oracle_ratio"] for r in group), max(r["oracle_ratio"] for r in group)
        return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}-{high:.3f}"

    return lines + [
        "",
        "Costs on the H200 at 128k / 1M (one layer, Qwen2.5-1.5B heads, 64-token blocks, as the model runs it): the default",
        "10.6 / 124 ms, 4 keys 8.5-8.7 / 95-96 ms, 2 keys 7.6 / 80 ms, beam 2 with 4 keys 5.6 / 61 ms (docs/benchmarks.md).",
        f"At 64-token blocks 4 or 2 representative keys keep nearly the default's recall (oracle ratio {span(fewer_4)} against",
        f"{d64_4['oracle_ratio']:.3f} at top_k 4, {span(fewer_16)} against {d64_16['oracle_ratio']:.3f} at top_k 16) but the "
        f"next-token KL at top_k 4 grows by {100 * kl_growth:.0f}%; at 16-token blocks",
        f"the oracle ratio falls from {d16['oracle_ratio']:.3f} to {keys16[4]['oracle_ratio']:.3f} (4 keys) and "
        f"{keys16[2]['oracle_ratio']:.3f} (2 keys), while KL and top-1 stay put. A beam of 2",
        f"loses more, in every layer ({narrow_64['oracle_ratio']:.3f} at 64:4 with KL "
        f"+{100 * (narrow_64['next_token_kl'] / d64_4['next_token_kl'] - 1):.0f}%; {narrow_16['oracle_ratio']:.3f} at 16:16). "
        "This is a 135M model at 8k tokens: the loss",
        f"at 64-token blocks is yet to be checked at longer contexts, where the search goes deeper. The default stays at beam "
        f"{d_beam} with {d_keys} keys; `RescoredSettings(representative_keys=4)`",
        "is the cheaper choice where 64-token blocks are used. With the default (causal) selection the default's oracle",
        f"ratios are {min(ratios):.3f}-{max(ratios):.3f}, below the target of 0.98 at the pruned budgets.",
    ] + (_wider_beams(rows, default, d_beam, d_keys, costs) if extra else [])


def _wider_beams(rows: list[dict], default: dict, d_beam: int, d_keys: int, costs: dict | None) -> list[str]:
    """What the beams wider than the default buy, at the default's representative keys, and (``costs``:
    ``benchmarks/rescore.py``'s rows of ``rescored:beam=B`` at 128k and 1M) what they cost."""
    wider = [r for r in rows if r["beam"] > d_beam and r["representative_keys"] == d_keys
             and (r["query_block"], r["top_k"]) in default]
    gains = [(r, default[(r["query_block"], r["top_k"])]) for r in wider]
    described = "; ".join(f"beam {r['beam']} at {r['query_block']}:{r['top_k']}: oracle ratio {r['oracle_ratio']:.3f} "
                          f"against {d['oracle_ratio']:.3f}, KL {r['next_token_kl']:.4f} against {d['next_token_kl']:.4f}"
                          for r, d in sorted(gains, key=lambda pair: (-pair[0]["beam"], pair[0]["query_block"])))
    best = max(r["oracle_ratio"] for r in wider)
    cost = ""
    if costs:
        ms = {(r["variant"], r["seq_len"]): 1e3 * r["estimate_s"] for r in costs["rows"] if r.get("estimate_s")}

        def at(beam: int) -> str:
            return f"{ms[(f'rescored:beam={beam}', 131072)]:.1f} / {ms[(f'rescored:beam={beam}', 1048576)]:.1f} ms"
        beams = sorted({r["beam"] for r in wider})
        cost = ("; they cost " + _listed(f"{at(beam)} (beam {beam})" for beam in beams) + " at 128k / 1M on the H200, "
                f"against the default's {at(d_beam)} (docs/benchmarks.md, ninth session)")
    return [
        "",
        f"Wider beams at {d_keys} keys raise the oracle ratio a little and the end-to-end figures not at all ({described})"
        + cost + f". The best, {best:.3f}, is still below 0.98: 1.5 to 2",
        "times the candidates recover little of the mass the oracle's blocks hold beyond the default's, and that mass",
        "costs almost no KL or top-1 (the oracle sections above).",
    ]


def causal_oracle_section(defaults: dict, run: dict) -> list[str]:
    """The default's end-to-end KL and top-1 against the oracle's blocks at its budgets, both with the
    default causal selection; ``defaults``: the rk file, whose rows without settings are the default's."""
    default = {(r["query_block"], r["top_k"]): r for r in defaults["rows"] if r["config"].count(":") == 2}
    oracles = sorted((r for r in run["rows"] if r["estimator"] == "oracle"),
                     key=lambda r: (r["query_block"], -r["top_k"]))
    lines = [
        "### The oracle's own blocks with the default causal selection (issue #11)",
        "The same comparison as the oracle section above, with today's default selection (`causal_selection=True`) on "
        "both sides: the oracle's rows from `" + run["command"] + f"` ({run['date']}, {run['machine']}; "
        "benchmarks/results/fidelity_e2e_8192_oracle_causal.json), the default's from the representative keys run "
        f"(benchmarks/results/fidelity_e2e_8192_rk.json). The first {run['length']:,} tokens of the shipped essays, "
        "sink 1, local 1.",
        "",
        "| budget | pruned | KL default / oracle | ratio | top-1 default / oracle | ratio | within 10% |",
        "|---|---|---|---|---|---|---|",
    ]
    deviations = []
    for o in oracles:
        r = default.get((o["query_block"], o["top_k"]))
        if r is None:
            continue
        kl_ratio, top1_ratio = r["next_token_kl"] / o["next_token_kl"], r["top1_agreement"] / o["top1_agreement"]
        deviations += [abs(kl_ratio - 1), abs(top1_ratio - 1)]
        within = "yes" if kl_ratio <= 1.1 and top1_ratio >= 0.9 else "no"
        if r["pruned_fraction"] < 0.90:
            within += " (below 90% pruned: no target)"
        lines.append(f"| {_label(r)} | {r['pruned_fraction']:.3f} | {r['next_token_kl']:.4f} / {o['next_token_kl']:.4f} | "
                     f"{kl_ratio:.3f} | {r['top1_agreement']:.3f} / {o['top1_agreement']:.3f} | {top1_ratio:.3f} | "
                     f"{within} |")
    if deviations:
        lines += ["", f"With causal selection the default's KL and top-1 are within {100 * max(deviations):.1f}% of the "
                  "oracle's blocks at every budget measured: the KL / top-1 target of issue #11 (within 10% at >= 90% "
                  "pruned) is met, although the default keeps less of the exact top-k's mass (the oracle ratios of the "
                  "section above).", ""]
    return lines
