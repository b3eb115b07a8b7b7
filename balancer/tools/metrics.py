"""A metrics log for any training loop: one JSON line per optimizer step.

``MetricsLogger(path, run="baseline").log(opt, step=t, extra={...})`` appends what the Balancer
saw in that step: per-group gradient norms, cosines, weights and losses; the same per task; the
step's imbalance ratio ``max_k ‖g_k‖² / min_k ‖g_k‖²`` over the tasks (``null`` when a task's
gradient is zero), the statistic Wu et al. (*Imbalanced Gradients in RL Post-Training of
Multi-Task LLMs*, arXiv 2510.19178) track; ``grad_norm`` and ``clip_coef``, the update's norm
before clipping and the clip factor (``null`` when the step did not clip); ``plugins``, each
plugin's own metrics (e.g. ``balanced_dpo``'s chosen/rejected norms and log-probs); ``extra``,
anything else, e.g. per-task rewards. Non-finite numbers are written as ``null`` so that every
line is strict JSON. ``balancer report`` turns the file into figures.

Tasks. By default every group is a task. A recipe that captures a task as several groups says
how to pool them with ``tasks=`` (a function from the step's stats to task-level stats) and adds
per-task numbers of its own with ``task_series=``: the split-half recipe
(:mod:`balancer.recipes.split_half`) logs its unbiased estimate of each task's ``‖E g_k‖²`` as::

    MetricsLogger(path, run="task_norm", tasks=pool_halves, task_series={"sq_norms_split_half": split_half_sq_norms})

which writes ``task_sq_norms_split_half`` in every line; ``balancer report`` draws any
``task_sq_norms_<estimate>`` series next to the naive ``task_sq_norms``.

Runs. Every line carries ``run`` (the name given) and ``run_id``, a number that tells apart the
runs of one file: a logger appending to a file takes the next number. :func:`read_metrics` groups
lines by run, so appending a run to an existing log adds a run instead of mixing two runs' steps
(a name used by several runs of one file is read as ``"name #<run_id>"``).

Example::

    with MetricsLogger("metrics.jsonl", run="task_norm") as log:
        for step in range(steps):
            ...
            opt.step()
            log.log(opt, step=step, extra={"reward": {"math": 0.4, "code": 0.1}})
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import torch

from balancer.contract.stats import GroupStats
from balancer.optimizer import Balancer

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MetricsLogger", "read_metrics", "step_record"]

TaskPooling = Callable[[GroupStats], GroupStats]
"""Step stats -> task-level stats (one row per task), e.g. :func:`balancer.recipes.split_half.pool_halves`."""
TaskSeries = Callable[[GroupStats], torch.Tensor | Sequence[float | None]]
"""Step stats -> one number per task (in the order of the pooled tasks)."""
_TASK_FIELDS = ("sq_norms", "weights", "cosines")


def _plain(value: Any) -> Any:
    """JSON-ready copy: tensors to lists, non-finite floats to ``None``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _ratio(sq_norms: list[float]) -> float | None:
    finite = [v for v in sq_norms if math.isfinite(v)]
    if len(finite) < 2 or min(finite) <= 0.0:
        return None
    return max(finite) / min(finite)


def step_record(
    stats: GroupStats,
    *,
    run: str,
    step: int,
    run_id: int | None = None,
    extra: Mapping[str, Any] | None = None,
    plugins: Mapping[str, Mapping[str, Any]] | None = None,
    tasks: GroupStats | None = None,
    task_series: Mapping[str, torch.Tensor | Sequence[float | None]] | None = None,
) -> dict[str, Any]:
    """The record :class:`MetricsLogger` writes for one step (plain Python, strict-JSON numbers).

    ``plugins`` holds each plugin's :meth:`~balancer.Plugin.metrics` (``Balancer.plugin_metrics()``);
    ``tasks`` the task-level stats (default: ``stats``, every group a task); ``task_series`` more
    per-task numbers, written as ``task_<name>``.
    """
    pooled = stats if tasks is None else tasks
    task_sq = pooled.sq_norms.tolist()
    record: dict[str, Any] = {
        "run": run,
        "run_id": run_id,
        "step": step,
        "groups": list(stats.names),
        "norms": stats.norms,
        "cosines": stats.cosines,
        "weights": stats.weights,
        "losses": stats.losses,
        "tasks": list(pooled.names),
        "task_sq_norms": task_sq,
        "task_weights": pooled.weights,
        "task_cosines": pooled.cosines,
        **{f"task_{name}": values for name, values in (task_series or {}).items()},
        "imbalance_ratio": _ratio(task_sq),
        "grad_norm": stats.grad_norm,  # the update's norm before clipping (null when the step did not clip)
        "clip_coef": stats.clip_coef,
        "plugins": {name: dict(values) for name, values in (plugins or {}).items() if values},
        "extra": dict(extra or {}),
    }
    return _plain(record)


def _next_run_id(path: Path) -> int:
    """One more than the largest ``run_id`` in the file (1 for a new file; unreadable lines are skipped)."""
    largest = 0
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                run_id = record.get("run_id") if isinstance(record, dict) else None
                if isinstance(run_id, int):
                    largest = max(largest, run_id)
    return largest + 1


class MetricsLogger:
    """Appends one JSON line per step to ``path`` (created with its folder if missing).

    Args:
        path: the ``.jsonl`` file.
        run: the run's name, written in every line with the run's ``run_id`` (see the module
            docstring), so that several runs can share a file (``balancer report`` draws one
            curve per run).
        append: keep what the file holds (default: this run gets the next ``run_id``); ``False``
            starts the file afresh.
        tasks: how the groups of a step pool into tasks (default: every group is a task).
        task_series: more per-task numbers, each computed from the step's stats and written as
            ``task_<name>``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        run: str = "run",
        append: bool = True,
        tasks: TaskPooling | None = None,
        task_series: Mapping[str, TaskSeries] | None = None,
    ) -> None:
        self.path = Path(path)
        self.run = run
        self.tasks = tasks
        self.task_series = dict(task_series or {})
        taken = [name for name in self.task_series if name in _TASK_FIELDS]
        if taken:
            raise ValueError(f"task_series names {taken} would replace the records' own task fields; rename them.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = _next_run_id(self.path) if append else 1
        self._file: IO[str] | None = self.path.open("a" if append else "w", encoding="utf-8")

    def log(
        self, source: Balancer | GroupStats, *, step: int, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Writes the step's line and returns it. ``source``: a Balancer (its ``last_stats``) or stats.

        Raises:
            ValueError: the Balancer has not taken a grouped step yet (``last_stats`` is ``None``).
        """
        if self._file is None:
            raise ValueError(f"MetricsLogger({str(self.path)!r}) is closed; create a new one to log more steps.")
        stats = source.last_stats if isinstance(source, Balancer) else source
        if stats is None:
            raise ValueError(
                "Nothing to log: the Balancer's last step had no groups (last_stats is None). Call log() "
                "after opt.step() of a step whose gradients were captured in `with opt.group(...)` blocks."
            )
        record = step_record(
            stats,
            run=self.run,
            run_id=self.run_id,
            step=step,
            extra=extra,
            plugins=source.plugin_metrics() if isinstance(source, Balancer) else None,
            tasks=self.tasks(stats) if self.tasks is not None else None,
            task_series={name: series(stats) for name, series in self.task_series.items()},
        )
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Reads a metrics log: ``{run: [records in file order]}``, runs in order of first appearance.

    A run is a ``(run, run_id)`` pair. A name shared by several runs of the file is told apart as
    ``"name #<run_id>"``. Lines without ``run_id`` (logs of earlier versions) start a new run of
    their name where the step does not increase.

    Raises:
        ValueError: a line is not a JSON object with ``run`` and ``step`` (the line number is given).
    """
    runs: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    unnumbered: dict[str, tuple[int, Any]] = {}  # name -> (runs so far, last step) of lines without run_id
    for number, record in _records(Path(path)):
        if not isinstance(record, dict) or "run" not in record or "step" not in record:
            raise ValueError(f"{path}:{number}: not a metrics record (a JSON object with 'run' and 'step').")
        name, run_id, step = str(record["run"]), record.get("run_id"), record["step"]
        if run_id is None:
            count, last = unnumbered.get(name, (0, None))
            numbers = isinstance(last, int | float) and isinstance(step, int | float)
            count += 0 if numbers and step > last else 1
            unnumbered[name] = count, step
            run_id = str(count)
        runs.setdefault((name, run_id), []).append(record)
    names = [name for name, _ in runs]
    return {
        (name if names.count(name) == 1 else f"{name} #{run_id}"): records for (name, run_id), records in runs.items()
    }


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg}).") from exc
