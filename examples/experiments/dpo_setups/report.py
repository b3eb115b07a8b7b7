"""Mean ± sd over seeds, paired differences against DPO (same seeds), markdown tables, the figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .training import LABELS

COLUMNS = {
    "chosen_mass": "π(C)",
    "ood_mass": "OOD mass",
    "expected_reward": "E_π[r*]",
    "kl": "KL(π‖π_ref)",
    "frontier_gap": "best E[r*] at this KL − E_π[r*]",
    "ood_implicit_corr": "corr(implicit, r*) on OOD",
    "ood_minus_chosen_implicit": "implicit reward: OOD − C",
    "delta_logp_chosen": "Δ log π_w",
    "delta_logp_rejected": "Δ log π_l",
    "grad_ratio_raw": "‖G_l‖/‖G_w‖",
}
PAIRED = {
    "chosen_mass": "Δ π(C)",
    "expected_reward": "Δ E_π[r*]",
    "kl": "Δ KL",
    "matched_kl_gain": "E[r*] gain at matched KL",
    "frontier_gap": "Δ gap to best",
    "ood_implicit_corr": "Δ corr on OOD",
    "ood_minus_chosen_implicit": "Δ (OOD − C)",
}
REFERENCE = ("chosen_mass", "ood_mass", "expected_reward", "kl", "ood_minus_chosen_implicit")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for one value); NaNs are dropped (a path that never reached a KL)."""
    t = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if t.numel() == 0:
        return math.nan, math.nan
    return t.mean().item(), t.std().item() if t.numel() > 1 else 0.0


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per method: mean ± sd of every final metric; per rule: mean ± sd of (rule − DPO) per seed."""
    runs = result["runs"]
    summary = {m: {k: mean_sd([r["final"][k] for r in rs]) for k in rs[0]["final"]} for m, rs in runs.items()}
    paired = {
        m: {
            k: mean_sd([r["final"][k] - d["final"][k] for r, d in zip(rs, runs["dpo"], strict=True)])
            for k in rs[0]["final"]
            if k != "matched_kl_gain"
        }
        | {"matched_kl_gain": mean_sd([r["final"]["matched_kl_gain"] for r in rs])}
        for m, rs in runs.items()
        if m != "dpo"
    }
    task = result["task"]
    reference = {k: mean_sd([t[k] for t in task]) for k in task[0] if not isinstance(task[0][k], list)}
    return {"summary": summary, "paired": paired, "reference": reference}


def _cell(value: tuple[float, float], digits: int = 2) -> str:
    mean, sd = value
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def tables(result: dict[str, Any]) -> str:
    """The per-method table, the paired table and the reference line (start, π*) of one setting."""
    s = result["stats"]
    columns = {k: v for k, v in COLUMNS.items() if k in s["summary"]["dpo"]}
    lines = ["| method | " + " | ".join(columns.values()) + " |", "| --- " * (len(columns) + 1) + "|"]
    for method, values in s["summary"].items():
        lines.append(f"| {LABELS[method]} | " + " | ".join(_cell(values[k]) for k in columns) + " |")
    paired = {k: v for k, v in PAIRED.items() if k in s["summary"]["dpo"]}
    lines += [
        "",
        "| rule − DPO (same seed) | " + " | ".join(paired.values()) + " |",
        "| --- " * (len(paired) + 1) + "|",
    ]
    for method, values in s["paired"].items():
        lines.append(f"| {LABELS[method]} | " + " | ".join(_cell(values[k]) for k in paired) + " |")
    ref = s["reference"]
    for who in ("start", "ideal"):
        keys = [k for k in REFERENCE if f"{who}_{k}" in ref]
        if keys:
            name = "start (π_ref)" if who == "start" else "π* ∝ π_ref·exp(r*/β)"
            lines.append(f"\n{name}: " + ", ".join(f"{COLUMNS[k]} = {_cell(ref[f'{who}_{k}'])}" for k in keys))
    lines.append(f"\nchosen responses also rejected in some pair: {_cell(ref['chosen_overlap'])}")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per setting: chosen-set mass (or Δ log π_w) against step, and E_π[r*] against KL (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.8 * len(results)), squeeze=False)
    for row, (name, result) in zip(axes, results.items(), strict=True):
        left = "chosen_mass" if "chosen_mass" in result["runs"]["dpo"][0]["curves"] else "logp_chosen"
        for method, runs in result["runs"].items():
            steps = runs[0]["curves"]["step"]
            curve = torch.tensor([r["curves"][left] for r in runs]).mean(0)
            kl = torch.tensor([r["curves"]["kl"] for r in runs]).mean(0)
            reward = torch.tensor([r["curves"]["expected_reward"] for r in runs]).mean(0)
            row[0].plot(steps, curve, label=LABELS[method].replace("`", ""))
            row[1].plot(kl, reward, label=LABELS[method].replace("`", ""))
        frontier = result["task"][0].get("frontier_kl")
        if frontier is not None:
            rewards = torch.tensor([t["frontier_reward"] for t in result["task"]]).mean(0)
            row[1].plot(frontier, rewards, "k--", lw=1, label="best reachable (π_λ ∝ π_ref·exp(λr*))")
            ideal = result["stats"]["reference"]
            row[1].plot(ideal["ideal_kl"][0], ideal["ideal_expected_reward"][0], "k*", ms=10, label="π* at this β")
            row[0].axhline(ideal["ideal_chosen_mass"][0], color="k", ls=":", lw=1, label="π*")
        row[0].set_title(f"{name}: {'mass on the chosen set' if left == 'chosen_mass' else 'mean log π_w'}")
        row[0].set_xlabel("step")
        row[1].set_title(f"{name}: E_π[r*] against KL(π‖π_ref), checkpoints")
        row[1].set_xlabel("KL")
        row[1].set_xlim(0, max(max(r["curves"]["kl"]) for rs in result["runs"].values() for r in rs) * 1.05)
    axes[0][0].legend(fontsize=7)
    axes[0][1].legend(fontsize=7)
    fig.suptitle("DPO vs balanced_dpo rules: mean over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
