"""``balancer demo``: the gradient imbalance of multi-task RL post-training, and a plugin's answer.

Reproduces, in miniature and on CPU, the measurement of Wu et al., *Imbalanced Gradients in RL
Post-Training of Multi-Task LLMs* (arXiv 2510.19178): one policy post-trained with GRPO on
several tasks at once (:mod:`balancer.demo.grpo`, tasks in :mod:`balancer.demo.tasks`), each task's
squared gradient norm estimated without bias every step (:mod:`balancer.recipes.split_half`), next to
its learning gain and its reward and advantage statistics. Then the same run (same seed, same
initial policy) with the plugins named on the command line, ``task_norm`` by default. Both runs
go to one metrics log (:mod:`balancer.tools.metrics`) and one figure (:mod:`balancer.tools.report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from balancer.config import build_plugins
from balancer.demo.grpo import GRPOConfig, LossNorm, train
from balancer.demo.summary import format_comparison, format_run, summarize
from balancer.demo.tasks import TASK_SETS, Task
from balancer.errors import ConfigError
from balancer.optimizer import Balancer
from balancer.recipes.split_half import pool_halves, split_half_sq_norms
from balancer.tools._extras import missing_extra
from balancer.tools.metrics import MetricsLogger, read_metrics
from balancer.tools.report import write_report

try:
    from tqdm import tqdm
except ImportError as exc:  # pragma: no cover - exercised without the demo extra only
    raise missing_extra(exc) from exc

__all__ = ["DEFAULT", "LOSS_NORMS", "QUICK", "run_demo"]

DEFAULT = GRPOConfig()
QUICK = GRPOConfig(steps=24, prompts=4, rollouts=4)
"""``--quick``: a smoke test of the whole pipeline (seconds), too short to learn anything."""
LOSS_NORMS: dict[str, LossNorm] = {"nature": "token", "length": "sequence"}
"""The loss normalisation of each ``--setting`` unless ``--loss-norm`` says otherwise."""


def _parse_plugins(plugins: str) -> list[str]:
    chosen = [p.strip() for p in plugins.split(",") if p.strip()]
    if not chosen:
        message = f"the balanced run needs at least one plugin; found {plugins!r}. Example: --plugins task_norm"
        raise ConfigError([("plugins", message)])
    build_plugins(chosen)  # unknown names and bad options fail here, before any training
    return chosen


@contextlib.contextmanager
def _progress(run: str, total: int) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """``update(step, rewards)`` after each step: a progress bar on a terminal, else a line per tenth of the run."""
    if sys.stderr.isatty():
        with tqdm(total=total, desc=f"{run:>12}", unit="step") as bar:

            def update_bar(step: int, rewards: dict[str, float]) -> None:
                bar.update()
                if step % 20 == 0 or step == total - 1:
                    bar.set_postfix_str(" ".join(f"{t}={r:.2f}" for t, r in rewards.items()), refresh=False)

            yield update_bar
        return
    marks = {max(0, round(total * tenth / 10) - 1) for tenth in range(1, 11)}

    def update_line(step: int, rewards: dict[str, float]) -> None:
        if step in marks:
            shown = " ".join(f"{t}={r:.2f}" for t, r in rewards.items())
            print(f"{run}: step {step + 1}/{total}  reward {shown}", file=sys.stderr, flush=True)

    yield update_line


def _train_logged(run: str, plugins: list[str], cfg: GRPOConfig, seed: int, log: Path, tasks: tuple[Task, ...]) -> None:
    """Trains one run, logging each step with the tasks pooled from their halves and the split-half estimates."""
    logger = MetricsLogger(log, run=run, tasks=pool_halves, task_series={"sq_norms_split_half": split_half_sq_norms})
    with logger, _progress(run, cfg.steps) as progress:

        def on_step(opt: Balancer, step: int, extra: dict[str, dict[str, float]]) -> None:
            logger.log(opt, step=step, extra=extra)
            progress(step, extra["reward"])

        train(tasks, plugins, cfg, seed, on_step)


def run_demo(
    *,
    steps: int | None = None,
    seed: int = 0,
    plugins: str = "task_norm",
    out: str | Path = "balancer-demo",
    quick: bool = False,
    loss_norm: LossNorm | None = None,
    threads: int = 1,
    setting: str = "nature",
) -> int:
    """Trains the baseline and the balanced run, prints their summaries, writes the log and figure.

    Args:
        steps: optimizer steps per run (default 600, or 24 with ``quick``).
        seed: same seed, same metrics (on the same machine and thread count).
        plugins: comma-separated plugin names for the balanced run, validated before training.
        out: folder for ``metrics.jsonl`` (rewritten) and ``report.png``.
        quick: small batches and few steps, for smoke tests.
        loss_norm: ``"sequence"`` sums each response's token terms, ``"token"`` averages them
            (default: ``"token"`` for the setting ``"nature"``, ``"sequence"`` for ``"length"``).
        threads: torch's intra-op threads while training (restored afterwards). The tensors are
            tiny, so one thread is the fastest; the metrics do not depend on it.
        setting: ``"nature"`` (tasks with 2-token answers that differ by nature) or ``"length"``
            (answers of 8, 1 and 1 tokens: the imbalance then follows the answer length).
    """
    if setting not in TASK_SETS:
        raise ConfigError([("setting", f"must be one of {sorted(TASK_SETS)}; found {setting!r}")])
    tasks = TASK_SETS[setting]
    chosen = _parse_plugins(plugins)
    cfg = dataclasses.replace(QUICK if quick else DEFAULT, loss_norm=loss_norm or LOSS_NORMS[setting])
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    out = Path(out)
    log = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    label = "+".join(chosen)
    print(
        "Multi-task GRPO post-training of one tiny GRU policy (after Wu et al., arXiv 2510.19178).\n"
        + "Tasks: "
        + ", ".join(f"{t.name} ({t.answer_len}-token answer)" for t in tasks)
        + f" (setting {setting!r})"
        + f".\nPer step and task: {cfg.prompts} prompts x {cfg.rollouts} responses, loss normalised per "
        f"{cfg.loss_norm}; |g|^2 per task: split-half estimate 4<g_A, g_B> (unbiased) and naive |g_A + g_B|^2.\n"
        f"Run 1: baseline (no balancing). Run 2: {label}. Seed {seed}, {cfg.steps} steps each.",
        flush=True,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _train_logged("baseline", [], cfg, seed, log, tasks)
        _train_logged(label, chosen, cfg, seed, log, tasks)
    finally:
        torch.set_num_threads(previous)
    runs = read_metrics(log)
    baseline, balanced = summarize(runs["baseline"]), summarize(runs[label])
    print(f"\n{format_run(baseline)}\n\n{format_run(balanced)}\n\n{format_comparison(baseline, balanced)}\n")
    report = write_report(log, out / "report.png")
    print(f"Metrics log: {log}\nReport:      {report}  (redraw with: balancer report {log} -o FILE.png)")
    return 0
