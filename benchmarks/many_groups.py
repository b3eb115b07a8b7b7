"""Many groups: step time and memory of every built-in plugin at k = 64 and k = 256 groups.

What is measured, on 2 CPU threads, for "no plugin" and for every plugin of
``balancer.plugins.BUILTIN_PLUGINS`` (default options, one plugin per run; the few that need more
get it from ``plugins_for``), at k = 64 and k = 256 groups, on an MLP of about 150k parameters
(64-256-256-256-10, the exact count n is printed) trained with AdamW. Each group is one tiny batch
of 8 samples with its own data and a cross-entropy loss, captured with
``opt.backward({name: loss})`` (so the loss values are recorded for the loss-based plugins). Every run gets its own
seeded model. Two plugins need a setup of their own:

* a plugin that ``needs_taps`` (``replay_bias``: its ``update`` passes the weights through) gets
  every group's logits tapped, ``opt.tap(logits, group=name, labels=y)``, so it reweights and
  counts the rows of all k groups inside the backward passes, as GSA does;
* ``balanced_dpo`` (``rule="norm"``, the default) balances the two groups named ``chosen`` and
  ``rejected`` and passes every other weight through: the first two groups get those names, so it
  does its work (its cost does not grow with k). Its ``rule="prob"`` acts at the log-prob taps
  of DPO pairs, which this model has not; it is not measured.

A ``BalancerWarning`` (a plugin that balanced nothing, losses it never saw) is an error here: a
run that measures an idle plugin reports the error instead of numbers.

Time: wall-clock time (``time.perf_counter``; on CPU every kernel has finished when the call
returns), or with ``--cpu-time`` the CPU time of the one thread that then does all the work
(``time.thread_time``; autograd runs CPU graphs on the calling thread), which other jobs on the
machine do not inflate. A step is the k forward+backward passes, ``opt.step()`` and
``opt.zero_grad()``.

* first s: the first step of a fresh Balancer. Each of its k groups arrives as a new row block,
  whose Gram matrix the step computes: this is where merging the blocks matters. It also
  allocates the rows and AdamW's state. The smallest over up to 3 fresh runs (no new one once
  they have taken 3 s of wall-clock time): the work is the same each time and noise
  only adds to it. A throwaway step before the first run pays the process's one-time costs
  (imports that the first optimizer step triggers).
* steady ms: the median of the steps that follow the last run's first step: up to 10, but no
  step starts once they have taken 3 s (wall clock), so a slow run reports the median of the
  steps done (at least one), marked ``*``; ``steps`` says how many.
* balance ms: median of ``opt.step()`` minus the inner AdamW step inside it (timed by step hooks
  on the inner optimizer, as in ``benchmarks/overhead.py``): Gram matrix, plugins, combination.
* plugins ms: median per step of the time spent inside the plugin's own methods (``update``,
  ``tap``, ``merge_tap_stats``), timed by wrapping them on the plugin instance: the plugins' part
  alone, on the step's real statistics. For ``replay_bias``: the k tap calls inside the backward
  passes plus the merge at ``step()``.

Memory:

* extra MiB: ``opt.backend.extra_bytes()`` after the last step, the rows the Balancer holds.
* state KiB: the bytes of the tensors in the plugin's state after the last step (Python scalars,
  strings and containers not counted).
* peak MiB: the peak of torch tensor memory allocated by the plugin's methods above what was live
  when each call started, the largest over the last step's calls. Each of those calls is
  repeated once after the timed steps, with the same arguments (plugins never modify their
  inputs), under ``torch.profiler`` with ``profile_memory=True``; its allocation and free
  events, summed in time order, give the exact peak of the CPU allocator's live bytes. Memory
  that BLAS/LAPACK allocate for their own workspace and Python objects are not counted (both
  small next to the tensors here). Peak RSS would not measure this on CPU: glibc reuses freed
  heap memory without touching RSS, so the RSS growth of a call says little about what it
  allocated.

Hard limit: the runs execute in a worker subprocess that streams its measurements; a run that
has not finished 60 s after it started (a plugin that is very slow at this k, or a native call
that never returns) is killed, reported with what it measured so far (``>60`` where the first
step did not finish) and the worker restarts with the next run. One such native call: with more
than one thread, torch's batched LU solve on MKL (``torch.linalg.solve_ex`` on a batch of
matrices of size above about 150) prints ``Parameter 6 was incorrect on entry to DLASWP`` and
never returns (pytorch/pytorch#142815, #141358); the QP polishing of ``upgrad`` (a batch of k
problems) and ``cagrad`` (a batch of 16) runs into it at k = 256. Lines the worker prints that
are not measurements (such as MKL's) are passed on to stderr.

Runs of one k follow each other, each to its end. Other jobs on a shared machine slow steps down:
medians and minima absorb short bursts, but a load that lasts seconds slows whole rows of
wall-clock times (tens of times over on a shared 2-core machine): use ``--cpu-time`` there (its
numbers are single-threaded, so not those of a quiet machine with 2 threads). ``--repeat N``
measures every row N times, in N rounds over all rows, and keeps for each row the round with the
fastest steady steps and the fastest first step of all rounds (noise only adds); a killed or
failed run is not repeated.

A plain table is printed, and with ``--markdown`` a table for the README (one row per plugin,
each cell ``k=64 / k=256``). Nothing is compared against a target: these are measurements.

Run::

    python benchmarks/many_groups.py               # full benchmark, about 3-4 minutes on 2 quiet cores
    python benchmarks/many_groups.py --markdown    # the same, plus the README table
    python benchmarks/many_groups.py --markdown --repeat 3   # best of 3 rounds (~8-13 min)
    python benchmarks/many_groups.py --cpu-time    # on a loaded machine: 1 thread, CPU time (~2.5 min)
    python benchmarks/many_groups.py --quick       # k = 4 and 8, a tiny MLP, 2 steps: a smoke run (~10 s)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from overhead import InnerClock, make_model  # benchmarks/overhead.py, next to this script
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from balancer import Balancer, BalancerWarning, Plugin
from balancer.plugins import BUILTIN_PLUGINS, RLW

NO_PLUGIN = "none"
GROUP_NAMES: dict[str, tuple[str, ...]] = {"balanced_dpo": ("chosen", "rejected")}  # names of the first groups
TIMED_METHODS = ("update", "tap", "merge_tap_stats")
STARTUP_LIMIT = 180.0  # seconds for a worker to import torch and take its warm-up step


@dataclasses.dataclass(frozen=True)
class Config:
    widths: tuple[int, ...]  # MLP layer widths, input to output
    batch: int  # samples per group
    groups: tuple[int, ...]  # values of k
    first_runs: int  # at most this many fresh runs for the first step
    iters: int  # at most this many steady steps per run
    budget: float  # wall-clock seconds after which no further first run, then no further steady step starts
    limit: float  # seconds: a run still going this long after it started is killed
    cpu_time: bool = False  # 1 thread, timed by its CPU time instead of the wall clock

    @property
    def threads(self) -> int:
        return 1 if self.cpu_time else 2

    @property
    def clock(self) -> Callable[[], float]:
        return time.thread_time if self.cpu_time else time.perf_counter


FULL = Config(widths=(64, 256, 256, 256, 10), batch=8, groups=(64, 256), first_runs=3, iters=10, budget=3.0, limit=60.0)
QUICK = Config(widths=(16, 32, 10), batch=4, groups=(4, 8), first_runs=2, iters=2, budget=1.0, limit=60.0)


def make_batches(cfg: Config, k: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    classes = cfg.widths[-1]
    return [
        (torch.randn(cfg.batch, cfg.widths[0], generator=gen), torch.randint(classes, (cfg.batch,), generator=gen))
        for _ in range(k)
    ]


def group_names(plugin: str, k: int) -> list[str]:
    names = list(GROUP_NAMES.get(plugin, ()))[:k]
    return names + [f"g{i}" for i in range(len(names), k)]


def plugins_for(plugin: str, names: list[str]) -> list[Plugin]:
    """The plugin under test with its default options, plus what it cannot run without: ``pcd``'s
    primary group and ``constant``'s weights name the first group; a plugin that transforms earlier
    weights (``crmogm``) comes after ``rlw`` (cheap, weights not all 1; its time is not counted)."""
    options = {"pcd": {"primary": names[0]}, "constant": {"weights": {names[0]: 2.0}, "default": 0.5}}
    tested = {cls.name: cls for cls in BUILTIN_PLUGINS}[plugin](options.get(plugin, {}))
    return [RLW(), tested] if tested.needs_earlier_plugin else [tested]


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# -- the plugins' part: time and allocation peak -----------------------------------------------
@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (the profiler's native start/stop lines)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_peak(call: Callable[[], object]) -> int:
    """Peak of the torch CPU allocator's live bytes during ``call()``, above those live at its start,
    from the profiler's ``[memory]`` events (+bytes per allocation, -bytes per free) in time order."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():
        prof.start()
    try:
        result = call()
    finally:
        with quiet_stderr():
            prof.stop()
    del result  # freed after the profiler stopped: its own outputs count as held at the end
    assert prof.profiler is not None
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


class PluginClock:
    """Times the plugin's own methods by wrapping them on the instance; keeps the last step's calls
    (method and arguments) so that they can be repeated under the memory profiler."""

    def __init__(self, plugin: Plugin, clock: Callable[[], float]) -> None:
        self.seconds = 0.0
        self.clock = clock
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        for method in TIMED_METHODS:
            if hasattr(plugin, method):  # the tap methods exist on tap plugins only
                setattr(plugin, method, self._timed(getattr(plugin, method)))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            self.calls.append((method, args))
            start = self.clock()
            try:
                return method(*args)
            finally:
                self.seconds += self.clock() - start

        return timed

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = []

    def peak_bytes(self) -> int:
        """The largest allocation peak over the last step's calls, each repeated once."""
        return max((allocation_peak(lambda m=method, a=args: m(*a)) for method, args in self.calls), default=0)


# -- one run, in the worker ------------------------------------------------------------------------
class Run:
    """One (plugin, k) pair: its own seeded model, AdamW, k tiny batches and a Balancer."""

    def __init__(self, cfg: Config, k: int, plugin: str) -> None:
        self.model = make_model(cfg.widths)
        self.batches = make_batches(cfg, k)
        self.names = group_names(plugin, k)
        inner = torch.optim.AdamW(self.model.parameters())
        self.clock = cfg.clock
        self.inner_clock = InnerClock(inner, self.clock)
        self.plugin_clock: PluginClock | None = None
        plugins: list[Plugin] = []
        if plugin != NO_PLUGIN:
            plugins = plugins_for(plugin, self.names)
            self.plugin_clock = PluginClock(plugins[-1], self.clock)
        self.tapped = any(p.needs_taps for p in plugins)
        self.opt = Balancer(inner, plugins)

    def step(self) -> dict[str, float]:
        if self.plugin_clock is not None:
            self.plugin_clock.reset()
        start = self.clock()
        for name, (x, y) in zip(self.names, self.batches, strict=True):
            logits = self.model(x)
            if self.tapped:
                logits = self.opt.tap(logits, group=name, labels=y)
            self.opt.backward({name: nn.functional.cross_entropy(logits, y)})
        backward_done = self.clock()
        self.opt.step()
        step_done = self.clock()
        self.opt.zero_grad()
        end = self.clock()
        return {
            "total": end - start,
            "balance": step_done - backward_done - self.inner_clock.seconds,
            "plugins": self.plugin_clock.seconds if self.plugin_clock is not None else math.nan,
        }


EVENT = "@event "  # prefix of the worker's measurement lines (native libraries may print to stdout too)


def emit(event: str, **values: Any) -> None:
    print(EVENT + json.dumps({"event": event, **values}), flush=True)


def measure(cfg: Config, k: int, plugin: str) -> None:
    """Runs one (plugin, k) pair, emitting each measurement as soon as it is known."""
    run, started = Run(cfg, k, plugin), time.perf_counter()
    for attempt in range(cfg.first_runs):
        if attempt:
            del run  # free the previous run's rows before the next one allocates its own
            gc.collect()
            run = Run(cfg, k, plugin)
        emit("first", **run.step())
        if time.perf_counter() - started >= cfg.budget:
            break
    done, started = 0, time.perf_counter()
    while done < cfg.iters and (done == 0 or time.perf_counter() - started < cfg.budget):
        emit("step", **run.step())
        done += 1
    plugin_clock = run.plugin_clock
    state = sum(tensor_bytes(s) for s in run.opt.plugin_states.values()) if plugin_clock else math.nan
    emit("memory", extra=run.opt.backend.extra_bytes(), state=state)
    emit("peak", bytes=plugin_clock.peak_bytes() if plugin_clock else math.nan)


def worker(cfg: Config, jobs: Sequence[tuple[str, int]]) -> None:
    warnings.simplefilter("error", BalancerWarning)
    torch.set_num_threads(cfg.threads)
    Run(cfg, 2, NO_PLUGIN).step()  # the first optimizer step of a process imports what it needs
    for plugin, k in jobs:
        emit("start", plugin=plugin, k=k)
        try:
            measure(cfg, k, plugin)
        except Exception as exc:  # reported in the table; the next run goes on
            emit("error", message=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        emit("done")
        gc.collect()  # the Balancer and its backend refer to each other: free the rows now


# -- the parent: runs the worker, enforces the limit -----------------------------------------------
@dataclasses.dataclass
class Result:
    plugin: str
    k: int
    first: float = math.nan  # s
    steps: list[dict[str, float]] = dataclasses.field(default_factory=list)
    extra: float = math.nan  # bytes
    state: float = math.nan  # bytes
    peak: float = math.nan  # bytes
    note: str = ""

    def median(self, key: str) -> float:
        return statistics.median(s[key] for s in self.steps) if self.steps else math.nan


def read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def apply_event(result: Result, kind: str, event: dict[str, Any]) -> None:
    if kind == "first":
        result.first = event["total"] if math.isnan(result.first) else min(result.first, event["total"])
    elif kind == "step":
        result.steps.append(event)
    elif kind == "memory":
        result.extra, result.state = event["extra"], event["state"]
    elif kind == "peak":
        result.peak = event["bytes"]
    elif kind == "error":
        result.note = event["message"]


def run_worker(cfg: Config, flags: list[str], pending: list[tuple[str, int]], report: Callable[[Result], None]) -> None:
    """One worker subprocess takes the pending jobs in order until they are done, it ends, or a run
    exceeds the limit (it is then killed). Reported jobs are removed from ``pending``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(f"{p}:{k}" for p, k in pending)]
    proc = subprocess.Popen(cmd + flags, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        current: Result | None = None
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if current is None:
                    raise SystemExit(f"The worker took more than {STARTUP_LIMIT:g} s to start.") from None
                current.note = f"killed after {cfg.limit:g} s"
                line = None
            if line is None:  # over the limit, or the worker ended
                if current is not None:
                    proc.kill()
                    current.note = current.note or f"the worker ended (exit code {proc.wait()})"
                    report(current)
                    pending.pop(0)
                elif pending:
                    raise SystemExit(f"The worker failed before its first run (exit code {proc.wait()}).")
                return
            if not line.startswith(EVENT):  # e.g. a native library's message: passed on
                if line.strip():
                    print(f"[worker] {line.rstrip()}", file=sys.stderr, flush=True)
                continue
            event = json.loads(line[len(EVENT) :])
            kind = event.pop("event")
            if kind == "start":
                current = Result(event["plugin"], event["k"])
                deadline = time.monotonic() + cfg.limit
            elif current is not None and kind == "done":
                report(current)
                pending.pop(0)
                current = None
            elif current is not None:
                apply_event(current, kind, event)
    finally:
        proc.kill()
        proc.wait()
        reader.join()  # the pipe is at its end once the worker is gone
        assert proc.stdout is not None
        proc.stdout.close()


def run_jobs(cfg: Config, flags: list[str], jobs: list[tuple[str, int]], report: Callable[[Result], None]) -> None:
    """Runs the jobs in worker subprocesses, a new one after a run that was killed or crashed."""
    pending = list(jobs)
    while pending:
        run_worker(cfg, flags, pending, report)


# -- tables --------------------------------------------------------------------------------------
COLUMNS = ("first s", "steady ms", "steps", "balance ms", "plugins ms", "extra MiB", "state KiB", "peak MiB")


def fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"


def first_cell(r: Result, cfg: Config, digits: int) -> str:
    return f">{cfg.limit:g}" if math.isnan(r.first) and r.note.startswith("killed") else fmt(r.first, digits)


def steady_cell(r: Result, cfg: Config, digits: int) -> str:
    return fmt(r.median("total"), digits, 1e3) + ("*" if r.steps and len(r.steps) < cfg.iters else "")


def header() -> str:
    return f"{'plugin':<12} {'k':>4} " + " ".join(f"{h:>10}" for h in COLUMNS) + "  note"


def plain_row(r: Result, cfg: Config) -> str:
    cells = (
        first_cell(r, cfg, 3),
        steady_cell(r, cfg, 1),
        f"{len(r.steps)}/{cfg.iters}",
        fmt(r.median("balance"), 2, 1e3),
        fmt(r.median("plugins"), 2, 1e3),
        fmt(r.extra, 1, 2**-20),
        fmt(r.state, 2, 2**-10),
        fmt(r.peak, 3, 2**-20),
    )
    return f"{r.plugin:<12} {r.k:>4} " + " ".join(f"{c:>10}" for c in cells) + (f"  {r.note}" if r.note else "")


def best_of(tries: list[Result]) -> Result:
    """The try with the fastest steady steps, given the fastest first step of all tries."""
    timed = [r for r in tries if r.steps]
    best = min(timed, key=lambda r: r.median("total")) if timed else tries[0]
    firsts = [r.first for r in tries if not math.isnan(r.first)]
    return dataclasses.replace(best, first=min(firsts)) if firsts else best


def print_markdown(results: list[Result], cfg: Config) -> None:
    by_key = {(r.plugin, r.k): r for r in results}
    ks = " / ".join(f"k={k}" for k in cfg.groups)
    headers = ("first step s", "steady step ms", "plugins ms", "extra MiB", "state KiB", "plugin peak MiB")
    print(f"| plugin ({ks}) | " + " | ".join(headers) + " |")
    print("| --- | " + " | ".join("---" for _ in headers) + " |")
    for plugin in dict.fromkeys(r.plugin for r in results):
        rows = [by_key[(plugin, k)] for k in cfg.groups]
        columns = [
            [first_cell(r, cfg, 2) for r in rows],
            [steady_cell(r, cfg, 0) for r in rows],
            [fmt(r.median("plugins"), 2, 1e3) for r in rows],
            [fmt(r.extra, 0, 2**-20) for r in rows],
            [fmt(r.state, 1, 2**-10) for r in rows],
            [fmt(r.peak, 2, 2**-20) for r in rows],
        ]
        name = "no plugin" if plugin == NO_PLUGIN else f"`{plugin}`"
        print(f"| {name} | " + " | ".join(" / ".join(c) for c in columns) + " |")


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step time and memory of every built-in plugin at many groups.")
    parser.add_argument("--quick", action="store_true", help="k = 4 and 8, tiny MLP, 2 steps (smoke run)")
    parser.add_argument("--markdown", action="store_true", help="also print the table for the README")
    parser.add_argument("--plugins", help="comma-separated subset of the plugins ('none': no plugin; default: all)")
    parser.add_argument("--cpu-time", action="store_true", help="1 thread, timed by its CPU time (loaded machines)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all rows; the best of each row is kept")
    parser.add_argument("--limit", type=float, help="seconds after which a run is killed (default: 60)")
    parser.add_argument("--worker", metavar="JOBS", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg = dataclasses.replace(cfg, cpu_time=args.cpu_time, limit=cfg.limit if args.limit is None else args.limit)
    flags = ["--quick"] * args.quick + ["--cpu-time"] * args.cpu_time  # what the worker's config depends on
    if args.worker:
        worker(cfg, [(p, int(k)) for p, k in (job.split(":") for job in args.worker.split(","))])
        return 0
    plugins = [NO_PLUGIN, *(cls.name for cls in BUILTIN_PLUGINS)]
    if args.plugins:
        wanted = args.plugins.split(",")
        if unknown := sorted(set(wanted) - set(plugins)):
            raise SystemExit(f"Unknown plugin(s) {unknown}; choose from {plugins}.")
        plugins = [p for p in plugins if p in wanted]
    started = time.perf_counter()
    n = sum(p.numel() for p in make_model(cfg.widths).parameters())
    print(
        f"MLP {'-'.join(map(str, cfg.widths))}: n = {n:,} parameters; AdamW; {cfg.batch} samples per group; "
        f"k = {', '.join(map(str, cfg.groups))}; {cfg.threads} thread(s), "
        + ("times are the main thread's CPU time" if cfg.cpu_time else "times are wall-clock times")
    )
    print(
        f"steady: median of up to {cfg.iters} steps after the first, none started after {cfg.budget:g} s "
        f"(* = fewer); a run is killed {cfg.limit:g} s after it started"
    )
    print("rows k*n*4 bytes: " + ", ".join(f"k={k}: {k * n * 4 / 2**20:.1f} MiB" for k in cfg.groups))
    if args.quick:
        print("--quick: a smoke run of the benchmark's code; its numbers say nothing about performance")
    rows = [(p, k) for k in cfg.groups for p in plugins]
    tries: dict[tuple[str, int], list[Result]] = {row: [] for row in rows}

    def report(result: Result) -> None:
        tries[(result.plugin, result.k)].append(result)
        print(plain_row(result, cfg), flush=True)

    for round_ in range(args.repeat):
        print(f"\nround {round_ + 1} of {args.repeat}" if args.repeat > 1 else "")
        print(header(), flush=True)
        run_jobs(cfg, flags, [row for row in rows if not any(r.note for r in tries[row])], report)
    results = [best_of(tries[row]) for row in rows]
    if args.repeat > 1:
        print(f"\nbest of {args.repeat} rounds\n{header()}")
        for result in results:
            print(plain_row(result, cfg))
    if args.markdown:
        print()
        print_markdown(results, cfg)
    print(f"\ntotal run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
