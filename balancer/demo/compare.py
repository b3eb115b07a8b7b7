"""The full comparison behind ``docs/demo.md``: every method, the same seeds and budget.

``python -m balancer.demo.compare`` trains, for each seed, one run per method on the tasks of
``--setting`` (default ``nature``: 2-token answers that differ by nature, per-token loss):

- ``plain``: uniform task mixing, no balancing;
- ``grad_sampling``: Wu et al.'s gradient-proportional task sampling (``sampling="gradient"``);
- ``task_norm``: equal per-task norms, from the naive norms ``‖g_A + g_B‖``;
- ``task_norm_split_half``: the same from the unbiased split-half estimate
  (``task_norm`` with ``estimate="split_half"`` on the halves);
- ``upgrad``: UPGrad (Quinton & Rey, 2024) on the tasks;
- ``famo``: FAMO (Liu et al., 2023) on the tasks' GRPO losses with ``min_loss = −3``: the
  per-token GRPO loss of a task is at least ``−(1+ε)·max|Â| = −1.2·7/√8 ≈ −2.97`` with 8
  responses per prompt, so ``ℓ − b`` stays positive (FAMO takes its logarithm);
- ``mt_grpo``: MT-GRPO (Ramesh et al., arXiv 2602.05547) as its paper runs it: the ``mt_grpo`` plugin
  learns task ratios ``z`` from the tasks' rewards and improvements (main-run defaults; the clip of the
  improvement scaled with the training lr as its code does), and the ratio-preserving sampler
  (:mod:`balancer.demo.mt_grpo`) draws each task's share ``z_k`` of the prompts, rejecting prompts with
  zero advantages for up to 10 rounds: it samples more rollouts per step than the other methods;
- ``rp_sampler_only``: the same sampler at uniform ratios (the plugin's ``lr = 0``): the sampler alone;
- ``mt_grpo_weights``: the learned ratios as loss weights ``K z_k`` with uniform sampling: the weights alone.

Every run uses the same initial policy and prompts for a given seed. The printed table gives
mean ± sd over the seeds of the worst task's and the mean task's final reward, each task's
final reward, and the paired difference to ``plain`` (same seed). All runs go to one metrics log.
``--reuse`` adds the methods of an earlier ``summary.json`` (same setting, seeds and steps) to the tables,
so one new method can be paired with stored ``plain`` runs without training them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from balancer.demo.grpo import GRPOConfig, train
from balancer.demo.run import LOSS_NORMS
from balancer.demo.summary import RunSummary, TaskSummary, summarize
from balancer.demo.tasks import TASK_SETS
from balancer.optimizer import Balancer
from balancer.recipes.split_half import pool_halves, split_half_sq_norms
from balancer.tools.metrics import MetricsLogger, read_metrics

__all__ = ["COMPARISON", "METHODS", "compare", "main"]

FAMO_MIN_LOSS = -3.0
MT_GRPO_OPTIONS = {"apply": "sampling", "improvement_clip": 0.1 * GRPOConfig().lr / 1e-6}
"""MT-GRPO's main-run defaults; its code scales the clip of ``I_k`` (0.1 at lr 1e-6) with the training lr."""
METHODS: dict[str, dict[str, Any]] = {
    "plain": {},
    "grad_sampling": {"sampling": "gradient"},
    "task_norm": {"plugins": ["task_norm"]},
    "task_norm_split_half": {"half_plugins": [("task_norm", {"estimate": "split_half"})]},
    "upgrad": {"plugins": ["upgrad"]},
    "famo": {"plugins": [("famo", {"min_loss": FAMO_MIN_LOSS})]},
    "mt_grpo": {"plugins": [("mt_grpo", MT_GRPO_OPTIONS)], "sampling": "ratio_preserving"},
    "rp_sampler_only": {"plugins": [("mt_grpo", {**MT_GRPO_OPTIONS, "lr": 0.0})], "sampling": "ratio_preserving"},
    "mt_grpo_weights": {"plugins": [("mt_grpo", {**MT_GRPO_OPTIONS, "apply": "weights"})]},
}
"""Method name -> the task plugins, the plugins on the halves and the task sampling."""
COMPARISON = GRPOConfig(steps=300, prompts=8, rollouts=8)
"""The budget of every run of the comparison (smaller than ``balancer demo``'s, to fit 5 seeds x 6 methods)."""


def _mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def _run(method: str, tasks: Any, cfg: GRPOConfig, seed: int, log: Path) -> None:
    spec = METHODS[method]
    cfg = dataclasses.replace(cfg, sampling=spec.get("sampling", "uniform"))
    logger = MetricsLogger(
        log, run=f"{method}/{seed}", tasks=pool_halves, task_series={"sq_norms_split_half": split_half_sq_norms}
    )
    with logger:

        def on_step(opt: Balancer, step: int, extra: dict[str, dict[str, float]]) -> None:
            logger.log(opt, step=step, extra=extra)

        train(tasks, spec.get("plugins", []), cfg, seed, on_step, half_plugins=spec.get("half_plugins", ()))


def table(summaries: dict[str, dict[int, RunSummary]]) -> str:
    """Mean ± sd over seeds per method, and the paired difference to ``plain`` on the same seeds."""
    first = next(iter(summaries.values()))
    names = [t.name for t in next(iter(first.values())).tasks]
    head = f"{'method':<21} {'worst task':>12} {'mean task':>12} " + " ".join(f"{n:>12}" for n in names)
    head += f" {'d worst vs plain':>17} {'d mean vs plain':>16} {'ratio (median)':>14}"
    lines = [head]
    plain = summaries.get("plain", {})
    for method, runs in summaries.items():
        seeds = sorted(runs)
        worst = [runs[s].worst_final for s in seeds]
        mean = [runs[s].mean_final for s in seeds]
        per_task = [_mean_sd([runs[s].tasks[k].reward_final for s in seeds]) for k in range(len(names))]
        paired = [s for s in seeds if s in plain]
        d_worst = _mean_sd([runs[s].worst_final - plain[s].worst_final for s in paired]) if paired else "n/a"
        d_mean = _mean_sd([runs[s].mean_final - plain[s].mean_final for s in paired]) if paired else "n/a"
        ratios = [r for r in (runs[s].imbalance_ratio for s in seeds) if r is not None]
        ratio = f"{statistics.median(ratios):.1f}" if ratios else "n/a"
        lines.append(
            f"{method:<21} {_mean_sd(worst):>12} {_mean_sd(mean):>12} "
            + " ".join(f"{v:>12}" for v in per_task)
            + f" {d_worst:>17} {d_mean:>16} {ratio:>14}"
        )
    return "\n".join(lines)


def _fmt(values: Sequence[float | None], spec: str) -> str:
    finite = [v for v in values if v is not None]
    return format(statistics.fmean(finite), spec) if finite else "n/a"


def measurement_table(summaries: dict[str, dict[int, RunSummary]]) -> str:
    """Per method and task, means over seeds: ``‖E g_k‖²`` (split-half, naive, last layer), gains, prompt
    share; per method, the rank correlations of ``‖E g_k‖²`` with the next gain, the reward, ``|Â|``, the last layer."""
    lines = [
        f"{'method':<21} {'task':<6} {'|g|^2 split':>11} {'naive':>9} {'last layer':>10} {'gain early':>10} "
        f"{'gain late':>9} {'mean |A|':>8} {'prompts':>7}"
    ]
    corr = [
        f"{'method':<21} {'rho(|g|^2, next gain)':>21} {'rho(., reward)':>14} {'rho(., |A|)':>11} {'rho(., last)':>12}"
    ]
    for method, runs in summaries.items():
        seeds = sorted(runs)
        for k, task in enumerate(runs[seeds[0]].tasks):
            rows = [runs[s].tasks[k] for s in seeds]
            lines.append(
                f"{method:<21} {task.name:<6} {_fmt([t.sq_norm for t in rows], '.2e'):>11} "
                f"{_fmt([t.sq_norm_naive for t in rows], '.2e'):>9} {_fmt([t.sq_norm_last for t in rows], '.2e'):>10} "
                f"{_fmt([t.gain_early for t in rows], '+.2f'):>10} {_fmt([t.gain_late for t in rows], '+.2f'):>9} "
                f"{_fmt([t.abs_advantage for t in rows], '.2f'):>8} {_fmt([t.prompt_share for t in rows], '.2f'):>7}"
            )
        corr.append(
            f"{method:<21} {_fmt([runs[s].gain_rank_correlation for s in seeds], '+.2f'):>21} "
            f"{_fmt([runs[s].reward_rank_correlation for s in seeds], '+.2f'):>14} "
            f"{_fmt([runs[s].advantage_rank_correlation for s in seeds], '+.2f'):>11} "
            f"{_fmt([runs[s].last_layer_rank_correlation for s in seeds], '+.2f'):>12}"
        )
    return "\n".join([*lines, "", *corr])


def compare(
    methods: Sequence[str], seeds: Sequence[int], setting: str, cfg: GRPOConfig, out: Path
) -> dict[str, dict[int, RunSummary]]:
    """Trains every method on every seed (one thread), logs to ``out/compare.jsonl``, returns the summaries."""
    tasks = TASK_SETS[setting]
    cfg = dataclasses.replace(cfg, loss_norm=LOSS_NORMS[setting])
    out.mkdir(parents=True, exist_ok=True)
    log = out / "compare.jsonl"
    log.unlink(missing_ok=True)
    for seed in seeds:
        for method in methods:
            start = time.perf_counter()
            _run(method, tasks, cfg, seed, log)
            print(f"{method} seed {seed}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    runs = read_metrics(log)
    return {m: {s: summarize(runs[f"{m}/{s}"]) for s in seeds} for m in methods}


def load_summaries(path: Path) -> dict[str, dict[int, RunSummary]]:
    """The summaries of a ``summary.json`` written by :func:`main`."""
    dump = json.loads(Path(path).read_text())

    def run(d: dict[str, Any]) -> RunSummary:
        return RunSummary(**{**d, "tasks": tuple(TaskSummary(**t) for t in d["tasks"])})

    return {m: {int(s): run(d) for s, d in runs.items()} for m, runs in dump.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balancer.demo.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--steps", type=int, default=COMPARISON.steps, help="steps per run (default 300)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--setting", choices=sorted(TASK_SETS), default="nature")
    parser.add_argument("--out", default="balancer-compare", help="folder for compare.jsonl and summary.json")
    parser.add_argument("--summary", help="print the tables of a summary.json written earlier, without training")
    parser.add_argument(
        "--reuse",
        help="a summary.json of earlier runs (same setting, seeds, steps): its methods not run now join the "
        "tables and the new summary.json (e.g. plain, for the paired differences of one new method)",
    )
    args = parser.parse_args(argv)
    reused = load_summaries(Path(args.reuse)) if args.reuse else {}
    if args.summary:
        loaded = load_summaries(Path(args.summary))
        loaded = {**{m: r for m, r in reused.items() if m not in loaded}, **loaded}
        print(f"{table(loaded)}\n\n{measurement_table(loaded)}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = dataclasses.replace(COMPARISON, steps=args.steps)
    summaries = compare(methods, range(args.seeds), args.setting, cfg, Path(args.out))
    summaries = {**{m: r for m, r in reused.items() if m not in summaries}, **summaries}
    elapsed = time.perf_counter() - start
    print(f"Setting {args.setting!r}, {args.seeds} seeds, {args.steps} steps per run, {elapsed:.0f} s in all.")
    print("Final reward (mean of the last 10% of steps), mean ± sd over seeds; d = paired difference to plain:")
    print(table(summaries))
    print("\nMeasurements (means over seeds; rho: Spearman over (task, window) pairs, mean over seeds):")
    print(measurement_table(summaries))
    dump = {m: {str(s): dataclasses.asdict(r) for s, r in runs.items()} for m, runs in summaries.items()}
    (Path(args.out) / "summary.json").write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
