"""A metrics log for any training loop: one JSON line per optimizer step.

``MetricsLogger(path, run="baseline").log(opt, step=t, extra={...})`` appends what the Balancer
saw in that step: per-group gradient norms, cosines, weights and losses, the same per task
(halves ``"x/A"``, ``"x/B"`` pooled into task ``"x"``, see :mod:`balancer.recipes.split_half`), the
split-half estimate of each task's squared gradient norm, and the step's imbalance ratio
``max_k ‖g_k‖² / min_k ‖g_k‖²`` of the naive task norms (``null`` when a task's gradient is
zero), the statistic Wu et al. (*Imbalanced Gradients in RL Post-Training of Multi-Task LLMs*,
arXiv 2510.19178) track; ``grad_norm`` and ``clip_coef`` are the update's norm before clipping
and the clip factor (``null`` when the step did not clip); ``plugins`` holds each plugin's own
metrics (e.g. ``balanced_dpo``'s chosen/rejected norms and log-probs). ``extra`` carries anything
else, e.g. per-task rewards. ``balancer report`` turns the file into figures. Non-finite numbers
are written as ``null`` so that every line is strict JSON.

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import torch

from balancer.contract.stats import GroupStats
from balancer.optimizer import Balancer
from balancer.recipes.split_half import pool_halves, split_half_sq_norms

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MetricsLogger", "read_metrics", "step_record"]


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
    extra: Mapping[str, Any] | None = None,
    plugins: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The record :class:`MetricsLogger` writes for one step (plain Python, strict-JSON numbers).

    ``plugins`` holds each plugin's :meth:`~balancer.Plugin.metrics` (``Balancer.plugin_metrics()``).
    """
    tasks = pool_halves(stats)
    task_sq = tasks.sq_norms.tolist()
    record: dict[str, Any] = {
        "run": run,
        "step": step,
        "groups": list(stats.names),
        "norms": stats.norms,
        "cosines": stats.cosines,
        "weights": stats.weights,
        "losses": stats.losses,
        "tasks": list(tasks.names),
        "task_sq_norms": task_sq,
        "task_sq_norms_split_half": split_half_sq_norms(stats),
        "task_weights": tasks.weights,
        "task_cosines": tasks.cosines,
        "imbalance_ratio": _ratio(task_sq),
        "grad_norm": stats.grad_norm,  # the update's norm before clipping (null when the step did not clip)
        "clip_coef": stats.clip_coef,
        "plugins": {name: dict(values) for name, values in (plugins or {}).items() if values},
        "extra": dict(extra or {}),
    }
    return _plain(record)


class MetricsLogger:
    """Appends one JSON line per step to ``path`` (created with its folder if missing).

    Args:
        path: the ``.jsonl`` file.
        run: written in every line, so that several runs can share a file (``balancer report``
            draws one column per run).
        append: keep what the file holds (default); ``False`` starts it afresh.
    """

    def __init__(self, path: str | Path, *, run: str = "run", append: bool = True) -> None:
        self.path = Path(path)
        self.run = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        plugins = source.plugin_metrics() if isinstance(source, Balancer) else None
        record = step_record(stats, run=self.run, step=step, extra=extra, plugins=plugins)
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

    Raises:
        ValueError: a line is not a JSON object with ``run`` and ``step`` (the line number is given).
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for number, record in _records(Path(path)):
        if not isinstance(record, dict) or "run" not in record or "step" not in record:
            raise ValueError(f"{path}:{number}: not a metrics record (a JSON object with 'run' and 'step').")
        runs.setdefault(str(record["run"]), []).append(record)
    return runs


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg}).") from exc
