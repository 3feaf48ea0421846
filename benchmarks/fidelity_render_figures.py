"""The figures of docs/fidelity.md (docs/img/fidelity_*.png), drawn by ``python -m benchmarks.fidelity render``
from the same JSON results as the page (benchmarks/fidelity_render.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.fidelity_render import ESTIMATOR_NAMES  # noqa: E402

PAPER = "stream"


def plot_recall_vs_pruned(comparison: dict, extra_rows: list[dict], path: Path) -> None:
    rows = [r for r in comparison["rows"] if r["kind"] == "fixed"] + extra_rows
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, block in zip(axes, (16, 32, 64)):
        by_name: dict[str, list] = {}
        for r in rows:
            if r["block"] == block:
                by_name.setdefault(r["estimator"], []).append((r["pruned"], r["recall_mean"], r["oracle_mean"]))
        oracle = sorted((p, o) for p, _, o in by_name.get(PAPER, []))  # same budgets for every estimator
        if oracle:
            ax.plot(*zip(*oracle), "k--", label="exact top-k oracle")
        for name, points in by_name.items():
            points.sort()
            ax.plot([p for p, _, _ in points], [r for _, r, _ in points], "o-",
                    label=ESTIMATOR_NAMES.get(name, name).strip("*"), lw=2.5 if name.startswith("rescored_stream") else 1)
        for r in comparison["rows"]:
            if r["kind"] == "adaptive" and r["block"] == block and "exact mass" in r["estimator"]:
                ax.plot(r["pruned"], r["recall_mean"], "s", color="grey", ms=4)
        ax.set(title=f"{block}-token blocks", xlabel="pruned fraction")
    axes[0].set_ylabel("attention mass recall (mean)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Recall against pruning (grey squares: adaptive budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_recall(e2e: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for r in e2e["rows"]:
        if "layers" not in r:
            continue
        label = f"{r['config']} (pruned {r['pruned_fraction']:.3f})"
        ax.plot([layer["layer"] for layer in r["layers"]], [layer["mass_recall_mean"] for layer in r["layers"]],
                "o-", ms=3, label=label)
    ax.set(xlabel="layer", ylabel="mass recall (mean)", title="Recall per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_needle_heads(ruler: dict, path: Path) -> None:
    heads = ruler.get("needle_head_table")
    if not heads:
        return
    import numpy as np

    mass, kept = np.array(heads["dense_mass"]), np.array(heads["kept"], dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 6))
    image = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0)
    missed = (mass >= ruler.get("threshold", 0.1)) & ~kept
    hit = (mass >= ruler.get("threshold", 0.1)) & kept
    ax.scatter(*np.nonzero(hit.T), marker="o", facecolors="none", edgecolors="white", s=30, label="needle head, kept")
    ax.scatter(*np.nonzero(missed.T), marker="x", color="red", s=30, label="needle head, missed")
    ax.set(xlabel="head", ylabel="layer")
    ax.set_title(heads.get("title", "dense attention mass on the needle"), fontsize=8)
    fig.colorbar(image, ax=ax)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
