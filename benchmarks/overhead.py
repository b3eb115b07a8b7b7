"""Overhead of the Balancer over plain gradient accumulation: step time and extra memory.

What is measured, on 2 CPU threads, for k = 2, 4 and 8 groups on an MLP of about 8.4M
parameters (1024-2048-2048-1024-10, the exact count n is printed) trained with AdamW. Each
group is one sub-batch of 64 samples with its own data and a cross-entropy loss.

* Baseline step: the k forward+backward passes accumulate (sum) into the ordinary ``.grad``,
  then ``AdamW.step()`` and ``zero_grad()``.
* Balancer step: the same k passes, each inside ``with opt.group(f"g{i}")``, then
  ``opt.step()`` and ``opt.zero_grad()``; once with no plugin, once with ``task_norm``, and once
  with ``task_norm`` and ``max_grad_norm`` (the "clipped" run: the update's norm from the Gram
  matrix, ``wᵀGw``, and the clip coefficient folded into the one combination). The clip is set
  below the update's norm so that it engages at every step.

Time: every run gets its own seeded model and warms up; then the three runs of one k take
steps in turn (the order rotates every round, so machine noise hits all of them) and the median
step time of each is kept. The ratio balancer/baseline has the target <= 1.15x. The clipped run
differs from the unclipped ``task_norm`` run only inside ``opt.step()``, so its cost is read
there: "clip cost" = (balance of the clipped run - balance of the unclipped run) / the unclipped
step time, target <= 2%; the ratio of the two whole steps is printed too, but on a shared
machine it mostly measures the noise in their identical forward and backward passes. Two parts of the
difference are shown on their own: "capture", the median forward+backward time of the balancer
minus the baseline's (zeroing the group rows, accumulating into them), and "balance", the median
of ``opt.step()`` minus the inner AdamW step inside it (Gram matrix, plugins, combination),
the inner step being timed by step hooks on the inner optimizer.

Memory: every (k, run) pair runs a few steps in a fresh subprocess (this script, with the same
model, data and number of steps) that reports its peak RSS. The measured extra memory is
peak(balancer) - peak(baseline), printed in units of k*n*4 bytes (target <= 1.1), next to the
analytic ``opt.backend.extra_bytes() / (k*n*4)``. "peak" covers the whole run, the first step
included; "steady" is the peak over the later steps only. Two details keep the numbers honest:

* the peak is ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: Linux carries the peak RSS
  of the spawning process over ``exec``, so a child's ``ru_maxrss`` is never below its parent's
  peak, and ``VmHWM`` can be reset (``/proc/self/clear_refs``) to measure the later steps alone;
* the children run with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor buffer is then its own
  mapping, returned to the system when freed, so RSS follows the live tensors instead of what
  glibc's heap happens to keep (tens of MB of run-to-run noise otherwise);
* every child, the baseline's included, first takes two steps of a tiny clipped Balancer: RSS
  also counts the library code pages a process has touched, and the clipped step's code paths
  alone touch about 1.5 MiB whatever the model's size; warming them in every child keeps that
  constant out of the comparison (it is 0.02 k·n for k = 2 here, not something that grows).

PASS/FAIL is printed per row against the targets; the script exits 0 either way.

Run::

    python benchmarks/overhead.py           # full benchmark, about 2.5 minutes on 2 cores
    python benchmarks/overhead.py --quick   # tiny MLP, 2 iterations: a smoke run, about 15 s

Most of the --quick time is starting Python processes (the parent and three memory children):
importing torch and the torch._dynamo import that the first optimizer triggers take ~4.5 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from torch import Tensor, nn

from balancer import Balancer

THREADS = 2
TIME_TARGET = 1.15  # balancer step time / baseline step time
CLIP_TARGET = 1.02  # clipped step time / unclipped (task_norm) step time
MEMORY_TARGET = 1.1  # extra memory in units of k*n*4 bytes
BASELINE = "baseline"
CLIP_NORM = 1e-3  # below the update's norm: the clip engages every step
PLUGINS: dict[str, tuple[list[str], float | None]] = {  # balancer runs: plugins, max_grad_norm
    "none": ([], None),
    "task_norm": (["task_norm"], None),
    "clipped": (["task_norm"], CLIP_NORM),
}
RUNS = (BASELINE, *PLUGINS)


@dataclass(frozen=True)
class Config:
    widths: tuple[int, ...]  # MLP layer widths, input to output
    batch: int  # samples per group (sub-batch)
    groups: tuple[int, ...]  # values of k
    warmup: int  # untimed steps per run
    iters: int  # timed steps per run
    memory_steps: int  # steps of a memory subprocess: the first one, then the steady ones


FULL = Config(widths=(1024, 2048, 2048, 1024, 10), batch=64, groups=(2, 4, 8), warmup=3, iters=25, memory_steps=3)
QUICK = Config(widths=(32, 64, 10), batch=8, groups=(2,), warmup=1, iters=2, memory_steps=2)


@dataclass(frozen=True)
class StepTime:
    total: float  # whole step: forward+backward, step(), zero_grad()
    forward_backward: float  # the k forward+backward passes
    balance: float  # step() minus the inner optimizer's step inside it


def make_model(widths: Sequence[int]) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [m for a, b in pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])  # no ReLU after the output layer


def make_batches(cfg: Config, k: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(cfg.batch, cfg.widths[0], generator=gen),
            torch.randint(cfg.widths[-1], (cfg.batch,), generator=gen),
        )
        for _ in range(k)
    ]


def param_count(cfg: Config) -> int:
    return sum(p.numel() for p in make_model(cfg.widths).parameters())


class InnerClock:
    """Times the last ``step()`` of an optimizer with its step pre- and post-hooks (``clock``:
    ``time.perf_counter`` by default; ``benchmarks/many_groups.py`` passes a CPU-time clock)."""

    def __init__(self, opt: torch.optim.Optimizer, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = 0.0
        self._start = 0.0
        self.clock = clock
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _pre(self, *_: object) -> None:
        self._start = self.clock()

    def _post(self, *_: object) -> None:
        self.seconds = self.clock() - self._start


class Trainer:
    """One run (``baseline`` or a balancer run) with its own seeded model, AdamW and k sub-batches."""

    def __init__(self, cfg: Config, k: int, run: str) -> None:
        self.model = make_model(cfg.widths)
        self.batches = make_batches(cfg, k)
        inner = torch.optim.AdamW(self.model.parameters())
        self.clock = InnerClock(inner)
        plugins, max_grad_norm = PLUGINS.get(run, ([], None))
        self.balancer = None if run == BASELINE else Balancer(inner, plugins, max_grad_norm=max_grad_norm)
        self.opt: torch.optim.Optimizer = inner if self.balancer is None else self.balancer

    def _group(self, i: int) -> AbstractContextManager[None]:
        return nullcontext() if self.balancer is None else self.balancer.group(f"g{i}")

    def step(self) -> StepTime:
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.batches):
            with self._group(i):
                nn.functional.cross_entropy(self.model(x), y).backward()
        backward_done = time.perf_counter()
        self.opt.step()
        step_done = time.perf_counter()
        self.opt.zero_grad()
        end = time.perf_counter()
        return StepTime(end - start, backward_done - start, step_done - backward_done - self.clock.seconds)

    def extra_bytes(self) -> int:
        return 0 if self.balancer is None else self.balancer.backend.extra_bytes()


# -- time ----------------------------------------------------------------------------------------
def time_runs(cfg: Config, k: int) -> dict[str, list[StepTime]]:
    """Warms up every run, then lets them take timed steps in turn, rotating the order each round."""
    trainers = {run: Trainer(cfg, k, run) for run in RUNS}
    for trainer in trainers.values():
        for _ in range(cfg.warmup):
            trainer.step()
    samples: dict[str, list[StepTime]] = {run: [] for run in RUNS}
    for i in range(cfg.iters):
        shift = i % len(RUNS)
        for run in RUNS[shift:] + RUNS[:shift]:
            samples[run].append(trainers[run].step())
    return samples


def median_ms(samples: list[StepTime], field: str) -> float:
    return 1e3 * statistics.median(getattr(s, field) for s in samples)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_time_rows(k: int, samples: dict[str, list[StepTime]]) -> None:
    base = median_ms(samples[BASELINE], "total")
    base_fb = median_ms(samples[BASELINE], "forward_backward")
    for run in PLUGINS:
        total = median_ms(samples[run], "total")
        capture = median_ms(samples[run], "forward_backward") - base_fb
        balance = median_ms(samples[run], "balance")
        ratio = total / base
        line = (
            f"{k:>3}  {run:<10} {base:>9.1f} {total:>9.1f} {ratio:>6.3f}x"
            f" {capture:>+10.1f} {balance:>9.1f}   {verdict(ratio <= TIME_TARGET)}"
        )
        if PLUGINS[run][1] is not None:
            unclipped = median_ms(samples["task_norm"], "total")
            clip_cost = (balance - median_ms(samples["task_norm"], "balance")) / unclipped
            line += (
                f"   clipped/unclipped {total / unclipped:.3f}x; clip cost {100 * clip_cost:+.1f}%"
                f" {verdict(1 + clip_cost <= CLIP_TARGET)}"
            )
        print(line)


# -- memory --------------------------------------------------------------------------------------
def peak_rss() -> int:
    """Peak resident set size of this process, in bytes (``VmHWM``, reported in kB)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS


def warm_code_paths() -> None:
    """Two steps of a tiny clipped Balancer, so that the code pages they touch are resident in every child."""
    model = nn.Linear(4, 2)
    opt = Balancer(torch.optim.AdamW(model.parameters()), ["task_norm"], max_grad_norm=1e-3)
    for _ in range(2):
        for i in range(2):
            with opt.group(f"g{i}"):
                model(torch.randn(3, 4)).pow(i + 1).sum().backward()
        opt.step()
        opt.zero_grad()


def memory_child(cfg: Config, k: int, run: str) -> None:
    """Runs in a fresh process: a few steps of one run, then prints its peak RSS as JSON."""
    warm_code_paths()
    trainer = Trainer(cfg, k, run)
    trainer.step()
    first = peak_rss()
    reset_peak_rss()
    for _ in range(cfg.memory_steps - 1):
        trainer.step()
    steady = peak_rss()
    print(json.dumps({"peak": max(first, steady), "steady": steady, "extra_bytes": trainer.extra_bytes()}))


def spawn_memory_child(quick: bool, k: int, run: str) -> dict[str, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(k), run]
    cmd += ["--quick"] if quick else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])


def measure_memory(quick: bool, cfg: Config) -> dict[tuple[int, str], dict[str, int]]:
    """Peak RSS of every (k, run) pair, each in its own subprocess (two at a time)."""
    jobs = [(k, run) for k in cfg.groups for run in RUNS]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda job: spawn_memory_child(quick, *job), jobs))
    return dict(zip(jobs, results, strict=True))


def print_memory_rows(k: int, n: int, peaks: dict[tuple[int, str], dict[str, int]]) -> None:
    unit = k * n * 4
    base = peaks[(k, BASELINE)]
    for run in PLUGINS:
        bal = peaks[(k, run)]
        extra = (bal["peak"] - base["peak"]) / unit
        steady = (bal["steady"] - base["steady"]) / unit
        analytic = bal["extra_bytes"] / unit
        print(
            f"{k:>3}  {run:<10} {base['peak'] / 2**20:>9.1f} {bal['peak'] / 2**20:>9.1f}"
            f" {extra:>9.3f} {steady:>9.3f} {analytic:>9.3f}   {verdict(extra <= MEMORY_TARGET)}"
        )


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step-time and memory overhead of the Balancer.")
    parser.add_argument("--quick", action="store_true", help="tiny MLP, 2 iterations (smoke run)")
    parser.add_argument("--memory-child", nargs=2, metavar=("K", "RUN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    cfg = QUICK if args.quick else FULL
    if args.memory_child:
        k, run = args.memory_child
        memory_child(cfg, int(k), run)
        return 0
    started = time.perf_counter()
    n = param_count(cfg)
    print(
        f"MLP {'-'.join(map(str, cfg.widths))}: n = {n:,} parameters; AdamW; {cfg.batch} samples per group; "
        f"{THREADS} threads; {cfg.iters} timed steps per run after {cfg.warmup} warm-up steps"
    )
    if args.quick:
        print("--quick: a smoke run of the benchmark's code; its numbers say nothing about overhead")

    print(f"\nMemory: peak RSS of a fresh process over {cfg.memory_steps} steps; extra in units of k*n*4 bytes")
    print(f"target: peak extra <= {MEMORY_TARGET} k*n; steady = peak over steps 2..{cfg.memory_steps} only")
    print(f"{'k':>3}  {'run':<10} {'base MiB':>9} {'bal MiB':>9} {'peak':>9} {'steady':>9} {'analytic':>9}   verdict")
    peaks = measure_memory(args.quick, cfg)
    for k in cfg.groups:
        print_memory_rows(k, n, peaks)

    print("\nTime: median ms per step (k forward+backward passes, step, zero_grad)")
    print(f"target: ratio balancer/baseline <= {TIME_TARGET}x, clipped/unclipped <= {CLIP_TARGET}x;")
    print("capture = extra forward+backward time,")
    print("balance = opt.step() minus the inner AdamW step")
    print(
        f"{'k':>3}  {'run':<10} {'baseline':>9} {'balancer':>9} {'ratio':>7} {'capture ms':>10} "
        f"{'balance':>9}   verdict"
    )
    for k in cfg.groups:
        print_time_rows(k, time_runs(cfg, k))

    print(f"\ntotal run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
