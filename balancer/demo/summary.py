"""What ``balancer demo`` prints: per-task gradient sizes next to learning gains, per run.

Wu et al. (*Imbalanced Gradients in RL Post-Training of Multi-Task LLMs*, arXiv 2510.19178)
define a task's learning gain as the increase of its training reward. Here a run of ``T`` steps
is cut into ``WINDOWS`` equal windows; ``R̄_k(j)`` is task k's mean training reward in window j
and ``S̄_k(j)`` the mean of its split-half estimates of ``‖E g_k‖²``. The gain that follows
window j is ``R̄_k(j+1) − R̄_k(j)``: with ``s = T / WINDOWS`` steps and ``t`` the end of window j,
``Gain(t) = mean R over (t, t+s] − mean R over [t−s, t)``. If large gradients meant large gains,
``S̄_k(j)`` and that gain would rank tasks alike: the summary gives their Spearman correlation
over all (task, window) pairs, and the same against the window's mean reward and mean ``|Â|``
(do rewards or advantages explain the norms?). The last-layer estimate (the output head) is
summarised next to the all-parameter one, with the rank correlation of the two.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["RunSummary", "TaskSummary", "format_comparison", "format_run", "summarize"]

WINDOWS = 5
FINAL_FRACTION = 0.1
"""The final reward is the mean training reward over the last 10% of the steps."""


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    name: str
    sq_norm: float
    """Mean split-half estimate of ``‖E g_k‖²`` over the run."""
    sq_norm_naive: float
    """Mean naive ``‖ĝ_k‖²`` over the run (biased upward by the batch noise)."""
    sq_norm_last: float
    """Mean split-half estimate of ``‖E g_k‖²`` on the last layer (the output head)."""
    prompt_share: float
    """Mean share of the step's prompts that went to the task (``1/K`` with uniform sampling)."""
    weight: float
    """Median weight over the steps where the task had a gradient (a zero gradient gets weight 0
    from ``task_norm``; a tiny one can get a huge weight, hence the median)."""
    reward_first: float
    """Mean reward in the first window."""
    reward_final: float
    gain_early: float
    """``R̄(1) − R̄(0)``: the gain from the first window to the second."""
    gain_late: float
    """``R̄(last) − R̄(1)``: the gain over the rest of the run."""
    abs_advantage: float
    zero_variance: float


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run: str
    steps: int
    tasks: tuple[TaskSummary, ...]
    imbalance_ratio: float | None
    """``max_k S̄_k / min_k S̄_k`` over the run's mean split-half estimates (``None`` if one is <= 0)."""
    imbalance_ratio_naive: float | None
    gain_rank_correlation: float | None
    """Spearman correlation of ``S̄_k(j)`` with the gain that follows window j, over tasks and windows."""
    advantage_rank_correlation: float | None
    """Spearman correlation of ``S̄_k(j)`` with the mean ``|Â|`` of window j."""
    reward_rank_correlation: float | None
    """Spearman correlation of ``S̄_k(j)`` with the mean reward of window j."""
    last_layer_rank_correlation: float | None
    """Spearman correlation of ``S̄_k(j)`` with its last-layer counterpart."""

    @property
    def worst_final(self) -> float:
        """The lowest final reward over the tasks."""
        return min(t.reward_final for t in self.tasks)

    @property
    def mean_final(self) -> float:
        """The final reward averaged over the tasks."""
        return _mean([t.reward_final for t in self.tasks])


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get their mean rank); ``None`` if either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = _mean(rx), _mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


def _spearman_pairs(pairs: Sequence[tuple[float, float]]) -> float | None:
    return spearman(*zip(*pairs, strict=True)) if pairs else None


def _windows(series: Sequence[float], count: int) -> list[float]:
    size = len(series) / count
    return [_mean(series[round(j * size) : round((j + 1) * size)]) for j in range(count)]


def _ratio(values: Sequence[float]) -> float | None:
    return max(values) / min(values) if values and min(values) > 0 else None


def summarize(records: Sequence[dict[str, Any]]) -> RunSummary:
    """Summary of one run's metrics records (as written by ``balancer demo``)."""
    tasks = records[0]["tasks"]
    windows = min(WINDOWS, len(records))
    final = max(1, round(FINAL_FRACTION * len(records)))
    summaries: list[TaskSummary] = []
    pairs_gain: list[tuple[float, float]] = []
    pairs_adv: list[tuple[float, float]] = []
    pairs_reward: list[tuple[float, float]] = []
    pairs_last: list[tuple[float, float]] = []
    total_prompts = [sum(r["extra"]["prompts"].values()) for r in records]
    for k, name in enumerate(tasks):
        split = [r["task_sq_norms_split_half"][k] for r in records]
        rewards = [r["extra"]["reward"][name] for r in records]
        advantages = [r["extra"]["abs_advantage"][name] for r in records]
        reward_w, split_w, adv_w = _windows(rewards, windows), _windows(split, windows), _windows(advantages, windows)
        pairs_gain += [(split_w[j], reward_w[j + 1] - reward_w[j]) for j in range(windows - 1)]
        pairs_adv += list(zip(split_w, adv_w, strict=True))
        pairs_reward += list(zip(split_w, reward_w, strict=True))
        last = [r["extra"]["sq_norm_last"][name] for r in records]
        pairs_last += list(zip(split_w, _windows(last, windows), strict=True))
        summaries.append(
            TaskSummary(
                name=name,
                sq_norm=_mean(split),
                sq_norm_naive=_mean([r["task_sq_norms"][k] for r in records]),
                sq_norm_last=_mean(last),
                prompt_share=_mean(
                    [r["extra"]["prompts"][name] / n for r, n in zip(records, total_prompts, strict=True)]
                ),
                weight=_median([r["task_weights"][k] for r in records if r["task_sq_norms"][k]]),
                reward_first=reward_w[0],
                reward_final=_mean(rewards[-final:]),
                gain_early=reward_w[min(1, windows - 1)] - reward_w[0],
                gain_late=reward_w[-1] - reward_w[min(1, windows - 1)],
                abs_advantage=_mean(advantages),
                zero_variance=_mean([r["extra"]["zero_variance_groups"][name] for r in records]),
            )
        )
    return RunSummary(
        run=records[0]["run"],
        steps=len(records),
        tasks=tuple(summaries),
        imbalance_ratio=_ratio([t.sq_norm for t in summaries]),
        imbalance_ratio_naive=_ratio([t.sq_norm_naive for t in summaries]),
        gain_rank_correlation=_spearman_pairs(pairs_gain),
        advantage_rank_correlation=_spearman_pairs(pairs_adv),
        reward_rank_correlation=_spearman_pairs(pairs_reward),
        last_layer_rank_correlation=_spearman_pairs(pairs_last),
    )


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def format_run(summary: RunSummary) -> str:
    """The per-task table of one run, then its imbalance ratio and rank correlations."""
    head = (
        f"{'task':<8} {'|g|^2 split-half':>16} {'|g|^2 naive':>11} {'last layer':>10} {'w median':>8} "
        f"{'reward first->final':>19} "
        f"{'gain early':>10} {'gain late':>9} {'mean |A|':>8} {'zero-var groups':>15}"
    )
    lines = [f"== {summary.run} ({summary.steps} steps) ==", head]
    for t in summary.tasks:
        lines.append(
            f"{t.name:<8} {_num(t.sq_norm, '.2e'):>16} {_num(t.sq_norm_naive, '.2e'):>11} "
            f"{_num(t.sq_norm_last, '.2e'):>10} {_num(t.weight, '.2f'):>8} "
            f"{_num(t.reward_first, '.2f') + ' -> ' + _num(t.reward_final, '.2f'):>19} "
            f"{_num(t.gain_early, '+.2f'):>10} {_num(t.gain_late, '+.2f'):>9} "
            f"{_num(t.abs_advantage, '.2f'):>8} {_num(t.zero_variance, '.2f'):>15}"
        )
    lines.append(
        f"imbalance ratio max/min |g|^2: {_num(summary.imbalance_ratio, '.1f')} (split-half), "
        f"{_num(summary.imbalance_ratio_naive, '.1f')} (naive)"
    )
    lines.append(
        "rank correlation of |g|^2 with the next window's learning gain: "
        f"{_num(summary.gain_rank_correlation, '+.2f')}; "
        f"with mean reward: {_num(summary.reward_rank_correlation, '+.2f')}; "
        f"with mean |A|: {_num(summary.advantage_rank_correlation, '+.2f')}; "
        f"with the last layer's |g|^2: {_num(summary.last_layer_rank_correlation, '+.2f')}"
    )
    return "\n".join(lines)


def format_comparison(baseline: RunSummary, balanced: RunSummary) -> str:
    """Final reward per task in both runs, and what happened to the baseline's worst task."""
    lines = [
        f"Final reward (mean of the last {FINAL_FRACTION:.0%} of steps):",
        f"{'task':<8} {baseline.run:>10} {balanced.run:>10} {'change':>7}",
    ]
    for a, b in zip(baseline.tasks, balanced.tasks, strict=True):
        lines.append(
            f"{a.name:<8} {a.reward_final:>10.2f} {b.reward_final:>10.2f} {b.reward_final - a.reward_final:>+7.2f}"
        )
    worst = min(range(len(baseline.tasks)), key=lambda k: baseline.tasks[k].reward_final)
    a, b = baseline.tasks[worst], balanced.tasks[worst]
    lines.append(
        f"worst task of {baseline.run}: {a.name}, {a.reward_final:.2f} -> {b.reward_final:.2f} with {balanced.run}"
    )
    return "\n".join(lines)
