"""``balancer report``: figures of a metrics log, every run on the same axes, one panel per task.

Columns are tasks; in each panel every run of the log is one curve (one colour per run), so a
baseline and a balanced run are compared on the same axes. Rows: the task's squared gradient
norm ``‖g_k‖²`` (the naive norm, dotted, and any other estimate the log carries, such as the
split-half one of :mod:`balancer.recipes.split_half`, solid), the weight the plugins gave the
task, and its training reward when the log carries ``extra["reward"]``. The last row is the
imbalance ratio of the update ``max_k ‖w_k g_k‖² / min_k ‖w_k g_k‖²`` of each run (the statistic
of Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task LLMs*, after weighting:
without plugins ``w_k = 1``).

Curves are moving averages over ``smooth`` steps (default: 1/15 of the longest run): the
split-half estimate of a single step is noisy and can be negative; its average is steadier
(averages <= 0 are left out of the log-scale rows). Drawn with matplotlib's Agg canvas: no
display, and no change to pyplot's global backend. Needs the ``demo`` extra (matplotlib, numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balancer.tools._extras import missing_extra
from balancer.tools.metrics import read_metrics

try:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
except ImportError as exc:  # pragma: no cover - exercised without the demo extra only
    raise missing_extra(exc) from exc

__all__ = ["draw_report", "write_report"]

SQ_NORMS = "task_sq_norms"
NAIVE = "naive"
DPI = 120


def _task_field(records: Sequence[dict[str, Any]], key: str, task: str) -> np.ndarray:
    """A task's series of a per-task list field such as ``task_sq_norms`` (``nan`` where absent or null)."""
    out = np.full(len(records), np.nan)
    for i, record in enumerate(records):
        tasks, values = record.get("tasks") or [], record.get(key) or []
        k = tasks.index(task) if task in tasks else len(values)
        if k < len(values) and values[k] is not None:
            out[i] = float(values[k])
    return out


def _extra(records: Sequence[dict[str, Any]], name: str, task: str) -> np.ndarray:
    """A task's series of ``extra[name][task]`` (``nan`` where absent or null)."""
    values = [(record.get("extra") or {}).get(name, {}).get(task) for record in records]
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
            tasks += [t for t in record.get("tasks") or [] if t not in tasks]
    return tasks


def _estimates(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """``(field, label)`` of each squared-norm series in the log: other estimates first, the naive norm last."""
    keys: list[str] = []
    for records in runs.values():
        for record in records:
            keys += [k for k in record if k.startswith(SQ_NORMS + "_") and k not in keys and record[k] is not None]
    return [(k, k[len(SQ_NORMS) + 1 :].replace("_", "-")) for k in keys] + [(SQ_NORMS, NAIVE)]


def _style(label: str, estimates: list[tuple[str, str]]) -> dict[str, Any]:
    """Solid for the first estimate; the naive norm dotted when another estimate is drawn."""
    if label == estimates[0][1]:
        return {"ls": "-", "lw": 1.4}
    return {"ls": ":", "lw": 1.0, "alpha": 0.8}


def _imbalance(records: list[dict[str, Any]], tasks: list[str], key: str, width: int) -> np.ndarray:
    """Ratios of longer averages (3 windows) of ``‖w_k g_k‖² = w_k² ‖g_k‖²``; a gap where an average is <= 0."""
    present = [t for t in tasks if any(t in (r.get("tasks") or []) for r in records)]
    contributions = [_task_field(records, key, t) * _weights(records, t) ** 2 for t in present]
    if len(contributions) < 2:
        return np.full(len(records), np.nan)
    averages = np.vstack([_smooth(c, 3 * width) for c in contributions])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((averages > 0).all(axis=0), averages.max(axis=0) / averages.min(axis=0), np.nan)


def _legend(fig: Figure, runs: dict[str, list[dict[str, Any]]], estimates: list[tuple[str, str]]) -> None:
    handles = [Line2D([], [], color=f"C{i % 10}", lw=2) for i in range(len(runs))]
    labels = [f"{name} ({len(records)} steps)" for name, records in runs.items()]
    if len(estimates) > 1:  # line styles tell the estimates apart: only then do they need a legend entry
        handles += [Line2D([], [], color="0.3", **_style(label, estimates)) for _, label in estimates]
        labels += [f"‖g‖²: {label}" for _, label in estimates]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)


def draw_report(runs: dict[str, list[dict[str, Any]]], *, smooth: int | None = None, title: str = "") -> Figure:
    """The report's figure for runs as :func:`~balancer.tools.metrics.read_metrics` returns them."""
    tasks, estimates = _tasks(runs), _estimates(runs)
    if not tasks:
        raise ValueError("no records with tasks to draw; write them with balancer.tools.metrics.MetricsLogger.")
    width = smooth if smooth is not None else max(1, max(len(r) for r in runs.values()) // 15)
    has_reward = any("reward" in (record.get("extra") or {}) for records in runs.values() for record in records)
    titles = ["squared gradient norm", "task weight", *(["training reward"] if has_reward else [])]
    cols = max(len(tasks), 2)
    fig = Figure(figsize=(3.4 * cols, 2.2 * (len(titles) + 1) + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(titles) + 1, cols)
    ratio_ax = fig.add_subplot(grid[len(titles), :])
    panels = [
        [fig.add_subplot(grid[row, col], sharex=ratio_ax) for col in range(len(tasks))] for row in range(len(titles))
    ]
    for i, records in enumerate(runs.values()):
        color = f"C{i % 10}"
        steps = np.array([r["step"] for r in records], dtype=float)
        for col, task in enumerate(tasks):
            for key, label in estimates:
                series = _positive(_smooth(_task_field(records, key, task), width))
                panels[0][col].plot(steps, series, color=color, **_style(label, estimates))
            panels[1][col].plot(steps, _smooth(_task_field(records, "task_weights", task), width), color=color)
            if has_reward:
                panels[2][col].plot(steps, _smooth(_extra(records, "reward", task), width), color=color)
        for key, label in estimates:
            ratio_ax.plot(steps, _imbalance(records, tasks, key, width), color=color, **_style(label, estimates))
    for col, task in enumerate(tasks):
        panels[0][col].set_title(task, fontsize=11)
        _log_scale_if_positive(panels[0][col])
        for upper in panels[:-1]:
            upper[col].tick_params(labelbottom=False)
    for row, text in enumerate(titles):
        panels[row][0].set_ylabel(text, fontsize=9)
    _log_scale_if_positive(ratio_ax)
    ratio_ax.set_ylabel(f"update imbalance\nmax/min ‖w_k g_k‖²\n({3 * width}-step averages)", fontsize=9)
    ratio_ax.set_xlabel("step")
    for ax in [*(ax for row in panels for ax in row), ratio_ax]:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    _legend(fig, runs, estimates)
    fig.suptitle(f"{title}moving averages over {width} steps", fontsize=10)
    return fig


def _log_scale_if_positive(ax: Any) -> None:
    """A log y-axis, unless no curve has a positive value (a task without gradient in a short run)."""
    if any(np.any(np.isfinite(y) & (y > 0)) for y in (np.asarray(line.get_ydata(), float) for line in ax.get_lines())):
        ax.set_yscale("log")


def write_report(log: str | Path, out: str | Path, *, smooth: int | None = None, dpi: int = DPI) -> Path:
    """Draws the figures of the metrics log ``log`` into the PNG ``out`` and returns its path.

    Raises:
        ValueError: the log holds no records, or a line is not a metrics record.
    """
    runs = read_metrics(log)
    if not runs:
        raise ValueError(f"{log}: no metrics records; write some with balancer.tools.metrics.MetricsLogger.")
    try:
        fig = draw_report(runs, smooth=smooth, title=f"{Path(log).name}: ")
    except ValueError as exc:
        raise ValueError(f"{log}: {exc}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
