"""Summaries (mean ± sd over seeds, paired differences) and the plot of ``examples/online_continual.py``."""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import numpy as np

from .methods import METHODS
from .streams import CLASSES, TASKS

KEYS = (
    "final_accuracy", "forgetting", "old_accuracy", "new_accuracy", "old_new_confusion",
    "ant_old_final", "ant_new_final", "weight_old", "weight_new",
)  # fmt: skip
PAIRS = (("gsa", "er"), ("gsa_w1", "er"), ("gsa", "gsa_w1"))
PAIRED_KEYS = ("final_accuracy", "forgetting", "old_accuracy", "new_accuracy")
COLORS = {"er": "tab:blue", "gsa_w1": "tab:red", "gsa": "tab:green"}


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    """Per memory size: each method's mean ± sd, and paired differences over the seeds both ran."""
    out: dict = {}
    for memory in sorted({r["memory"] for r in runs}):
        by = {m: {r["seed"]: r for r in runs if r["memory"] == memory and r["method"] == m} for m in METHODS}
        row: dict = {m: {k: mean_std([r[k] for r in rs.values()]) for k in KEYS} for m, rs in by.items() if rs}
        for m in row:
            row[m]["seeds"] = len(by[m])
        for a, b in PAIRS:
            seeds = sorted(set(by[a]) & set(by[b]))
            for k in PAIRED_KEYS if seeds else ():
                diff = [by[a][s][k] - by[b][s][k] for s in seeds]
                row.setdefault("paired", {})[f"{a} - {b}: {k}"] = (*mean_std(diff), len(seeds))
        out[str(memory)] = row
    return out


def print_summary(summary: dict) -> None:
    head = ("final acc", "forgetting", "old acc", "new acc", "old->new", "weight old", "weight new")
    keys = ("final_accuracy", "forgetting", "old_accuracy", "new_accuracy", "old_new_confusion", "weight_old")
    for memory, row in summary.items():
        print(f"\nmemory {memory}")
        print(f"{'method':<30}{'seeds':>6}" + "".join(f"{h:>16}" for h in head))
        for m, label in METHODS.items():
            if m in row:
                cells = [f"{row[m][k][0]:.3f} ± {row[m][k][1]:.3f}" for k in (*keys, "weight_new")]
                print(f"{label:<30}{row[m]['seeds']:>6}" + "".join(f"{c:>16}" for c in cells))
        for name, (mean, std, n) in row.get("paired", {}).items():
            print(f"  paired {name}: {mean:+.3f} ± {std:.3f} (n={n})")


def plot(runs: list[dict], path: Path, memory: int) -> None:
    """Left: accuracy over the seen classes after each task. Right: per-class ANT over the stream
    (class k = the k-th class to arrive; mean over seeds) of GSA's objective with weights 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    tasks = np.arange(1, TASKS + 1)
    for m, label in METHODS.items():
        rs = [r for r in runs if r["memory"] == memory and r["method"] == m]
        if not rs:
            continue
        seen = np.array([[np.mean(r["accuracy_matrix"][t][: t + 1]) for t in range(TASKS)] for r in rs])
        left.errorbar(tasks, seen.mean(0), yerr=seen.std(0), marker="o", color=COLORS[m], label=label, capsize=3)
    left.set(xlabel="after task", ylabel="accuracy over seen classes", xticks=tasks, title=f"memory {memory}")
    left.legend()
    rs = [r for r in runs if r["memory"] == memory and r["method"] == "gsa_w1"]
    if rs:
        length = min(len(r["ant_trace"]) for r in rs)
        trace = np.array([[row[2:] for row in r["ant_trace"][:length]] for r in rs], dtype=float)
        with warnings.catch_warnings():  # classes not arrived yet: all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(trace, axis=0)
        cmap = plt.get_cmap("viridis")
        for c in range(CLASSES):
            right.plot(np.clip(mean[:, c], 0.1, 10), color=cmap(c / (CLASSES - 1)), label=f"class {c}")
        right.axhline(1.0, color="gray", linewidth=0.8)
        right.set(yscale="log", xlabel="trace point (every 25 stream batches)", ylabel="ANT (clipped to [0.1, 10])")
        right.set_title(f"per-class ANT, weights 1 (class k: k-th to arrive; {len(rs)} seeds)", fontsize=10)
        right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
