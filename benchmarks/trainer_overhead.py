"""Overhead of ``BalancedTrainer`` over the plain ``transformers.Trainer``: step time and extra memory.

What is measured, on 2 CPU threads, for k = 2 and 4 groups, on a Llama built from a config (hidden
512, 8 layers, vocabulary 8000: about 42M parameters, the exact count n is printed), trained with
``Trainer``'s AdamW and its default ``max_grad_norm=1.0``:

* both trainers take the same micro-batches: ``gradient_accumulation_steps=k``, each micro-batch
  one group's ``batch`` sequences of ``seq`` tokens, in order (``train_sampling_strategy=
  "sequential"``, so micro-batch i of a step is group i);
* the plain ``Trainer`` accumulates the k backward passes into ``.grad`` and clips and steps;
* ``BalancedTrainer(balancer=["task_norm"], group_by="task")`` runs each micro-batch's backward
  inside ``opt.group(task)`` (a micro-batch of one group is not split or copied), so the k group
  gradients land in the rows of the Balancer's ``[k, n]`` buffer; ``step()`` computes the Gram
  matrix, the weights and the clipped combination, then AdamW steps.

Time: a step is timed from ``on_step_begin`` to ``on_step_end`` (the k forward+backward passes,
clipping, ``optimizer.step()``, the scheduler and ``zero_grad``; not the data loading or the
logging between steps). The two trainers run ``train()`` in two threads that take steps strictly in
turn (one holds a baton from the start of its step until the start of its next one, so nothing of
the other runs meanwhile), which spreads machine drift over both. The median over the timed steps
after ``warmup`` steps is kept; ratio balanced/plain, target <= 1.05x. The median time of the
``optimizer.step()`` inside each step (``on_pre_optimizer_step`` to ``on_optimizer_step``) is printed
too: the balanced one holds the Gram matrix, the plugins and the combination; the rest of the
difference is the capture in the backward passes and the clipping (from ``wᵀGw``).

Memory: every (k, trainer) pair runs a few steps in a fresh subprocess (this script) that reports
its peak RSS (``VmHWM``; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the
RSS, as in ``benchmarks/overhead.py``). The measured extra memory is peak(balanced) - peak(plain)
in units of k*n*4 bytes, target <= 1.1, printed next to the analytic
``opt.backend.extra_bytes() / (k*n*4)``.

PASS/FAIL is printed per row against the targets; the script exits 0 either way. Run::

    python benchmarks/trainer_overhead.py           # about 4 minutes on 2 idle cores
    python benchmarks/trainer_overhead.py --quick   # tiny Llama, 2 timed steps: a smoke run
    python benchmarks/trainer_overhead.py --no-memory  # the time table only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from balancer.integrations.transformers import BalancedTrainer

THREADS = 2
TIME_TARGET = 1.05  # balanced step time / plain step time
MEMORY_TARGET = 1.1  # extra memory in units of k*n*4 bytes
RUNS = ("plain", "balanced")


@dataclass(frozen=True)
class Config:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    batch: int  # sequences per micro-batch (one group's)
    seq: int  # tokens per sequence
    groups: tuple[int, ...]  # values of k
    warmup: int  # untimed steps per trainer
    iters: int  # timed steps per trainer
    memory_steps: int  # steps of a memory subprocess


FULL = Config(512, 2048, 8, 8000, batch=4, seq=32, groups=(2, 4), warmup=2, iters=12, memory_steps=3)
QUICK = Config(32, 64, 2, 64, batch=2, seq=8, groups=(2,), warmup=1, iters=2, memory_steps=2)


def make_model(cfg: Config) -> LlamaForCausalLM:
    set_seed(0)
    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=8 if cfg.hidden >= 256 else 4, max_position_embeddings=cfg.seq,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def make_dataset(cfg: Config, k: int, steps: int) -> Dataset:
    """``steps`` optimizer steps of k micro-batches, micro-batch i of each step all of group ``g{i}``."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(cfg.vocab, (steps * k * cfg.batch, cfg.seq), generator=gen).tolist()
    tasks = [f"g{(i // cfg.batch) % k}" for i in range(len(ids))]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "task": tasks})


def make_trainer(cfg: Config, k: int, run: str, steps: int, out: str, callbacks: list[Any]) -> Trainer:
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=cfg.batch, gradient_accumulation_steps=k,
        train_sampling_strategy="sequential", learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10_000,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    common = {
        "model": make_model(cfg),
        "args": args,
        "train_dataset": make_dataset(cfg, k, steps),
        "callbacks": callbacks,
    }
    trainer = (
        Trainer(**common) if run == "plain" else BalancedTrainer(**common, balancer=["task_norm"], group_by="task")
    )
    trainer.remove_callback(PrinterCallback)  # keeps the train summary out of the tables
    return trainer


def param_count(cfg: Config) -> int:
    return sum(p.numel() for p in make_model(cfg).parameters())


# -- time ----------------------------------------------------------------------------------------
class Baton:
    """Lets the trainers' threads take steps in turn; a finished (or failed) runner passes for good."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.turn = RUNS[0]
        self.done: set[str] = set()

    def wait(self, run: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == run or len(self.done) == len(RUNS) - 1)

    def pass_on(self, run: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(run)
            self.turn = next(r for r in RUNS if r != run)
            self.cond.notify_all()


class StepClock(TrainerCallback):
    """Times each step from ``on_step_begin`` to ``on_step_end``, and the ``optimizer.step()`` inside it
    (``on_pre_optimizer_step`` to ``on_optimizer_step``), taking turns through the baton."""

    def __init__(self, baton: Baton, run: str) -> None:
        self.baton, self.run = baton, run
        self.seconds: list[tuple[float, float]] = []  # (whole step, optimizer.step())
        self.start = self.opt_start = self.opt_seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self.baton.pass_on(self.run)
        self.baton.wait(self.run)
        self.start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.opt_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.opt_seconds = time.perf_counter() - self.opt_start

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append((time.perf_counter() - self.start, self.opt_seconds))

    def on_train_end(self, args, state, control, **kwargs):
        self.baton.pass_on(self.run, finished=True)


def time_runs(cfg: Config, k: int) -> dict[str, list[tuple[float, float]]]:
    """Per-step seconds of each trainer after warm-up; the two train in turn, step by step."""
    baton = Baton()
    clocks = {run: StepClock(baton, run) for run in RUNS}
    steps = cfg.warmup + cfg.iters
    with tempfile.TemporaryDirectory() as out:
        trainers = {run: make_trainer(cfg, k, run, steps, f"{out}/{run}", [clocks[run]]) for run in RUNS}
        errors: list[BaseException] = []

        def train(run: str) -> None:
            try:
                trainers[run].train()
            except BaseException as exc:  # re-raised below, after the other thread ends
                errors.append(exc)
                baton.pass_on(run, finished=True)

        threads = [threading.Thread(target=train, args=(run,)) for run in RUNS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    return {run: clocks[run].seconds[cfg.warmup :] for run in RUNS}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- memory --------------------------------------------------------------------------------------
def peak_rss() -> int:
    """Peak resident set size of this process, in bytes (``VmHWM``, reported in kB)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024


def memory_child(cfg: Config, k: int, run: str) -> None:
    """Runs in a fresh process: a few steps of one trainer, then prints its peak RSS as JSON."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(cfg, k, run, cfg.memory_steps, out, [])
        trainer.train()
        extra = trainer.balancer.backend.extra_bytes() if isinstance(trainer, BalancedTrainer) else 0
    print(json.dumps({"peak": peak_rss(), "extra_bytes": extra}))


def spawn_memory_child(quick: bool, k: int, run: str) -> dict[str, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(k), run, *(["--quick"] * quick)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {k} {run} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def measure_memory(quick: bool, cfg: Config) -> dict[tuple[int, str], dict[str, int]]:
    jobs = [(k, run) for k in cfg.groups for run in RUNS]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda job: spawn_memory_child(quick, *job), jobs))
    return dict(zip(jobs, results, strict=True))


# -- main ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Step-time and memory overhead of BalancedTrainer over Trainer.")
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 2 timed steps (a smoke run)")
    parser.add_argument("--no-memory", action="store_true", help="time only: skip the memory subprocesses")
    parser.add_argument("--memory-child", nargs=2, metavar=("K", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    hf_logging.set_verbosity_error()
    cfg = QUICK if args.quick else FULL
    if args.memory_child:
        memory_child(cfg, int(args.memory_child[0]), args.memory_child[1])
        return 0
    started = time.perf_counter()
    n = param_count(cfg)
    print(
        f"Llama hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab}: n = {n:,} parameters; AdamW, "
        f"max_grad_norm 1.0; {cfg.batch}x{cfg.seq} tokens per micro-batch, one micro-batch per group; "
        f"{THREADS} threads; {cfg.iters} timed steps per trainer after {cfg.warmup} warm-up steps"
    )
    if args.quick:
        print("--quick: a smoke run of the benchmark's code; its numbers say nothing about overhead")

    if not args.no_memory:
        print(f"\nMemory: peak RSS of a fresh process over {cfg.memory_steps} steps; extra in units of k*n*4 bytes")
        print(f"target: measured extra <= {MEMORY_TARGET} k*n")
        print(f"{'k':>3}  {'plain MiB':>10} {'balanced MiB':>12} {'measured':>9} {'analytic':>9}   verdict")
        peaks = measure_memory(args.quick, cfg)
        for k in cfg.groups:
            unit, plain, balanced = k * n * 4, peaks[(k, "plain")], peaks[(k, "balanced")]
            measured, analytic = (balanced["peak"] - plain["peak"]) / unit, balanced["extra_bytes"] / unit
            print(
                f"{k:>3}  {plain['peak'] / 2**20:>10.1f} {balanced['peak'] / 2**20:>12.1f} {measured:>9.3f}"
                f" {analytic:>9.3f}   {verdict(measured <= MEMORY_TARGET)}"
            )

    print("\nTime: median ms per optimizer step (k forward+backward passes, clip, step, zero_grad)")
    print(f"target: ratio balanced/plain <= {TIME_TARGET}x; opt.step = the median optimizer.step() inside the step")
    print(
        f"{'k':>3}  {'plain ms':>9} {'balanced ms':>11} {'ratio':>7} {'plain opt.step':>14} {'bal. opt.step':>13}"
        "   verdict"
    )
    for k in cfg.groups:
        seconds = time_runs(cfg, k)
        (plain, plain_opt), (balanced, balanced_opt) = (
            (1e3 * statistics.median(s[0] for s in seconds[run]), 1e3 * statistics.median(s[1] for s in seconds[run]))
            for run in RUNS
        )
        ratio = balanced / plain
        print(
            f"{k:>3}  {plain:>9.1f} {balanced:>11.1f} {ratio:>6.3f}x {plain_opt:>14.1f} {balanced_opt:>13.1f}"
            f"   {verdict(ratio <= TIME_TARGET)}"
        )

    print(f"\ntotal run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
