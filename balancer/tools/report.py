"""``balancer report``: figures of a metrics log, one column per run, side by side.

Rows: per-task squared gradient norms ``‖g_k‖²`` (split-half estimate where the log has one,
and the naive norm), the weights the plugins gave each task, the imbalance ratio of the update
``max_k ‖w_k g_k‖² / min_k ‖w_k g_k‖²`` (the statistic of Wu et al., *Imbalanced Gradients in RL
Post-Training of Multi-Task LLMs*, after weighting: without plugins ``w_k = 1``), and the training
reward when the log carries ``extra["reward"]``. Curves are moving averages
over ``smooth`` steps (default: 1/15 of the run): the split-half estimate of a single step is
noisy and can be negative; its average is steadier (averages <= 0 are left out of the log-scale
rows). Rows share their y axis across runs. Drawn with matplotlib's Agg canvas: no display, and
no change to pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from balancer.tools.metrics import read_metrics

__all__ = ["write_report"]

TITLES = (
    "squared gradient norm\n(solid split-half, dotted naive)",
    "task weight",
    "update imbalance\nmax/min ‖w_k g_k‖²",
    "training reward",
)


def _task_field(records: Sequence[dict[str, Any]], key: str, task: str) -> np.ndarray:
    """A task's series of a per-task list field such as ``task_sq_norms`` (``nan`` where absent or null)."""
    out = np.full(len(records), np.nan)
    for i, record in enumerate(records):
        tasks, values = record["tasks"], record.get(key) or []
        k = tasks.index(task) if task in tasks else len(values)
        if k < len(values) and values[k] is not None:
            out[i] = float(values[k])
    return out


def _extra(records: Sequence[dict[str, Any]], name: str, task: str) -> np.ndarray:
    """A task's series of ``extra[name][task]`` (``nan`` where absent or null)."""
    values = [record["extra"].get(name, {}).get(task) for record in records]
    return np.array([np.nan if v is None else float(v) for v in values])


def _weights(records: Sequence[dict[str, Any]], task: str) -> np.ndarray:
    """A task's weights; 1 where the log has none (stats logged without a Balancer step)."""
    return np.nan_to_num(_task_field(records, "task_weights", task), nan=1.0)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average over ``width`` steps, ignoring ``nan`` (``nan`` where none is finite)."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(hi - width, 0)
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


def _positive(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values, np.nan)


def _tasks(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    tasks: list[str] = []
    for records in runs.values():
        for record in records:
            tasks += [t for t in record["tasks"] if t not in tasks]
    return tasks


def _draw_run(axes: Sequence[Any], records: list[dict[str, Any]], tasks: list[str], width: int) -> None:
    steps = np.array([r["step"] for r in records], dtype=float)
    colors = {t: f"C{i % 10}" for i, t in enumerate(tasks)}
    split = {t: _smooth(_task_field(records, "task_sq_norms_split_half", t), width) for t in tasks}
    naive = {t: _smooth(_task_field(records, "task_sq_norms", t), width) for t in tasks}
    has_split = any(np.isfinite(v).any() for v in split.values())
    for t in tasks:
        if has_split:
            axes[0].plot(steps, _positive(split[t]), color=colors[t], label=t)
            axes[0].plot(steps, _positive(naive[t]), color=colors[t], lw=0.8, ls=":", alpha=0.7)
        else:
            axes[0].plot(steps, _positive(naive[t]), color=colors[t], label=t)
        axes[1].plot(steps, _smooth(_task_field(records, "task_weights", t), width), color=colors[t], label=t)
        reward = _extra(records, "reward", t)
        if len(axes) > 3 and np.isfinite(reward).any():
            axes[3].plot(steps, _smooth(reward, width), color=colors[t], label=t)
    # The update's imbalance: ratios of longer averages (3 windows) of ‖w_k g_k‖² = w_k² ‖g_k‖²;
    # a task whose average is <= 0 leaves a gap.
    estimates = [("task_sq_norms_split_half", "split-half", "k", "-")] if has_split else []
    for key, label, color, style in [*estimates, ("task_sq_norms", "naive", "0.5", ":")]:
        contributions = [_task_field(records, key, t) * _weights(records, t) ** 2 for t in tasks]
        averages = np.vstack([_smooth(c, 3 * width) for c in contributions])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where((averages > 0).all(axis=0), averages.max(axis=0) / averages.min(axis=0), np.nan)
        axes[2].plot(steps, ratio, color=color, ls=style, label=f"{label} (averages over {3 * width} steps)")


def write_report(log: str | Path, out: str | Path, *, smooth: int | None = None, dpi: int = 80) -> Path:
    """Draws the figures of the metrics log ``log`` into the PNG ``out`` and returns its path.

    Raises:
        ValueError: the log holds no records, or a line is not a metrics record.
    """
    runs = read_metrics(log)
    if not runs:
        raise ValueError(f"{log}: no metrics records; write some with balancer.tools.metrics.MetricsLogger.")
    tasks = _tasks(runs)
    longest = max(len(r) for r in runs.values())
    width = smooth if smooth is not None else max(1, longest // 15)
    has_reward = any("reward" in record["extra"] for records in runs.values() for record in records)
    rows = len(TITLES) if has_reward else len(TITLES) - 1
    fig = Figure(figsize=(5.2 * len(runs), 2.4 * rows))
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, len(runs), sharex="col", sharey="row", squeeze=False)
    for col, (name, records) in enumerate(runs.items()):
        _draw_run(list(grid[:, col]), records, tasks, width)
        grid[0, col].set_title(f"{name}  ({len(records)} steps)")
        grid[-1, col].set_xlabel("step")
    for row in range(rows):
        grid[row, 0].set_ylabel(TITLES[row])
        for ax in grid[row]:
            ax.grid(True, alpha=0.3)
            if row in (0, 2):
                ax.set_yscale("log")
    grid[0, -1].legend(loc="best", fontsize=8)
    grid[2, -1].legend(loc="best", fontsize=8)
    fig.suptitle(f"{Path(log).name}: moving averages over {width} steps", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
