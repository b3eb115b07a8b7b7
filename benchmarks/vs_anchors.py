"""The Balancer's aggregators against the anchor libraries: step time and extra memory.

The two CPU scenarios of the research notes (research/balancing-libraries.md, section 9), on 2
threads, Adam(lr=1e-3), k = 4:

* ``groups``: trunk ``Linear(512,1024)-ReLU-Linear(1024,512)-ReLU`` + one head ``Linear(512,10)``;
  the batch of 64 is split into 4 groups of 16 samples, one cross-entropy loss per group; every
  parameter is shared (n = 1,055,242).
* ``heads``: the same trunk + 4 heads ``Linear(512,10)``; batch 64, one trunk forward, 4
  cross-entropy task losses (n = 1,070,632, heads included).

Methods, for each aggregator (``upgrad``, ``mgda``, ``pcgrad``, ``fairgrad`` with alpha 1,
``config``, and the loss weighting ``gradnorm`` with alpha 1.5; ``anchor_catalog.py`` lists which
library has which); one step is always forward + the method's backward/aggregation + ``step()`` +
``zero_grad()``:

* ``sum``: the plain step on the summed losses (one forward over the batch, one backward);
  the same for every aggregator. ``sum-groups`` (``groups`` only): the same k per-group forward
  and backward passes as the Balancer, accumulated into ``.grad``: what the group structure
  itself costs, before any balancing.
* ``balancer``: ``Balancer(Adam, plugins=[aggregator])``. In ``groups`` each group is its own
  forward of 16 samples and its backward inside ``with opt.group(...)`` (``gradnorm``, which reads
  the losses: ``opt.backward({group: loss})`` per group, which records them): the way a user holding
  per-group batches writes it, and the cheaper correct one. One forward over the 64 samples and
  ``opt.backward`` of the 4 sliced group losses (``retain_graph``) runs each of the 4 backward
  passes over all 64 rows (the other groups' rows carry zero gradients, which autograd does not
  skip): about 1.2x the time of the per-group forwards in a development run. In ``heads``: one
  trunk forward and ``opt.backward({task: loss})``.
* ``balancer-tasks``: ``Balancer(Adam, plugins=[aggregator], model=net)`` and
  ``opt.backward_tasks({group: loss})`` on the same losses as ``balancer`` (per-group forwards in
  ``groups``, one trunk forward in ``heads``): one backward per loss asks only for the linear
  layers' output gradients, and the Gram and update come from those and the layer inputs. The
  recommended path for ``heads``: the time target applies to it.
* ``balancer-samples`` (``groups`` only): one forward over the 64 samples and
  ``opt.backward_samples(per_sample_losses / 16, group=row_groups)``: one backward pass. The
  recommended path for ``groups``: the time target applies to it.
* ``torchjd``: torchjd 0.18 as documented: ``autojac.backward(losses)`` (``groups``, one forward,
  the losses of the 4 sample groups) or ``autojac.mtl_backward(losses, features=trunk_output)``
  (``heads``), then ``jac_to_grad(params, aggregator)``; ``torchjd-gramopt`` is the same with
  ``jac_to_grad(..., optimize_gramian_computation=True)`` (no concatenated Jacobian; faster on
  CPU; not for ConFIG, which is not Gramian-based). The Balancer is compared with the faster.
* ``libmtl``: LibMTL 1.1.5 ``LibMTL.weighting.MGDA`` (``mgda_gn='none'``) / ``PCGrad`` /
  ``GradNorm`` mixed into a minimal model class, as its Trainer does (``anchor_methods_weighting.py``:
  GradNorm's weights are parameters stepped by the same Adam; the plugin's Adam gets its lr).
  Loaded without LibMTL's package ``__init__`` (which needs torchvision): a bare ``LibMTL`` module
  pointing at the install folder, then ``import LibMTL.weighting``. Its k
  ``backward(retain_graph=True)`` passes take the same per-group forwards as the Balancer in
  ``groups`` (LibMTL's ``multi_input`` mode).
* ``pto``: pytorch-optimizer 4.1 ``PCGrad(Adam, reduction='sum')``, ``pc_backward(losses)``
  (pcgrad only), per-group forwards in ``groups`` as well.

Which update each method computes: in ``groups`` all methods aggregate the full gradients. In
``heads`` the Balancer and pytorch-optimizer aggregate the gradients of all parameters (a head's
coordinates are zero in the other tasks' gradients), which is torchjd's ``autojac.backward`` on
all parameters; torchjd's ``mtl_backward`` and LibMTL aggregate the trunk only and give the heads
their plain gradients. Before timing, the script takes one step of every method from the same
model and data and compares the gradient handed to Adam (captured by a step pre-hook; Adam's
first step is about ``lr·sign(g)``, so the gradient is the sharper test) with a reference of the
same definition, as a relative L2 difference (PASS below the printed tolerance): UPGrad against
torchjd; MGDA against the exact min-norm point of the Gram matrix (every support's KKT system
solved); PCGrad against the closest of its (k-1)!^k random projection orders (its result depends
on the order as soon as a gradient conflicts with two others); FairGrad and ConFIG against
torchjd's aggregator on the float64 gradients. The reference for the trunk-only definition
aggregates the trunk columns and adds the heads' plain gradients. GradNorm, whose weights move
only through their own update, is checked over 5 steps, updates and weights, against a float64
replay of LibMTL's definition (``anchor_references_weighting.py``; its norms cover what each
method weighs: LibMTL the shared parameters, the Balancer every captured parameter).

Time: every method has its own seeded model and warms up; then all methods of a scenario take
steps in turn (the order rotates each round, so machine load hits all of them) and the median
step time is kept. The script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=33554432`` and
``MALLOC_TRIM_THRESHOLD_=68719476736`` (as in the research notes): otherwise glibc returns the
multi-MB gradient buffers to the system at every free and page-faults them back in the next
step, which makes timings bimodal and 1.5-2x slower. For the Balancer, ``fwd+bwd`` is its
forward+backward time (capture copies included) and ``balance`` is ``opt.step()`` minus the inner
Adam step (Gram matrix, plugin, combination). The machine's load shows in every median: run it
on a quiet machine, and print ``uptime`` next to the numbers you quote.

Memory: torch's allocation records (``torch.profiler`` with ``profile_memory=True``), in time
order, from a freshly built model and optimizer (no gradient, no optimizer state) over the
first ``memory_steps`` steps: the peak of the bytes allocated and not yet freed. "extra" is that
peak minus the ``sum`` method's, in units of k·n·4 bytes, so buffers a method keeps between steps
count. The same measurement for every method; host memory outside torch tensors (numpy in
quadprog, LibMTL's Python loops) is not counted, and is tiny.

Targets (PASS/FAIL printed for every Balancer path; the script exits 0 either way): ``groups``
Balancer time <= 1.3x ``sum``; ``heads`` Balancer time <= 0.9x the faster torchjd (``n/a`` for
``gradnorm``); Balancer extra memory <= 1.1 k·n everywhere. The time targets are the issue's for
the scenario's recommended path (``balancer-samples``, ``balancer-tasks``); the other paths are
printed for comparison.

The scenarios and methods are in ``anchor_methods*.py`` (which ones: ``anchor_catalog.py``), the
references in ``anchor_references*.py``; this file times, measures memory and reports.

Run::

    python benchmarks/vs_anchors.py           # full run, all 6 aggregators: a few minutes
    python benchmarks/vs_anchors.py --quick   # tiny model, 3 timed steps: a smoke run, < 1 minute
    python benchmarks/vs_anchors.py --threads 1 --cpu-time   # on a loaded machine (see --help)
    python benchmarks/vs_anchors.py --aggregator fairgrad --aggregator config   # some aggregators
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from anchor_catalog import AGGREGATORS, METHODS, all_keys, balancer_paths, build
from anchor_methods import CLOCK, FULL, QUICK, Config, Data, K, Key, Method, Net, StepTime, make_data
from anchor_references import check, verdict
from anchor_references_weighting import check_gradnorm

THREADS = 2
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
GROUPS_TARGET = 1.3  # balancer / sum, groups scenario
HEADS_TARGET = 0.9  # balancer / fastest torchjd, heads scenario
MEMORY_TARGET = 1.1  # balancer extra memory, k*n*4 bytes


# -- time ----------------------------------------------------------------------------------------
def time_methods(cfg: Config, methods: dict[Key, Method]) -> dict[Key, list[StepTime]]:
    for method in methods.values():
        for _ in range(cfg.warmup):
            method.step()
    keys = list(methods)
    samples: dict[tuple[str, str], list[StepTime]] = {key: [] for key in keys}
    for i in range(cfg.iters):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            samples[key].append(methods[key].step())
    return samples


def median_ms(samples: list[StepTime], field: str = "total") -> float:
    return 1e3 * statistics.median(getattr(s, field) for s in samples)


# -- memory --------------------------------------------------------------------------------------
def measure_memory(data: Data, keys: list[Key], steps: int) -> dict[Key, tuple[int, int]]:
    """Per method: the peak of the torch-allocated bytes live in its window (its ``steps`` steps
    from a freshly built model and optimizer), over all steps and over steps 2.. only.

    One profiler session for all methods (starting one costs about a second); each method is
    built and freed outside every window, with the garbage collector off inside, so only the
    method's own allocations and frees fall in its window.
    """
    windows: dict[Key, list[str]] = {key: [f"vs_anchors {key} step {i}" for i in range(steps)] for key in keys}
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        for key in keys:
            method = build(data, key)
            gc.collect()
            gc.disable()
            try:
                for label in windows[key]:
                    with torch.profiler.record_function(label):
                        method.step()
            finally:
                gc.enable()
            del method
            gc.collect()
    events = prof.profiler.kineto_results.events()
    marks = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("vs_anchors ")}
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peaks = {}
    for key, labels in windows.items():
        start, second, end = marks[labels[0]][0], marks[labels[min(1, steps - 1)]][0], marks[labels[-1]][1]
        live = peak = steady = 0
        for time_ns, nbytes in records:
            if start <= time_ns <= end:
                live += nbytes
                peak = max(peak, live)
                steady = max(steady, live) if time_ns >= second else steady
        peaks[key] = (peak, steady)
    return peaks


# -- report --------------------------------------------------------------------------------------
def report(data: Data, n: int, samples: dict[Key, list[StepTime]], peaks: dict[Key, tuple[int, int]]) -> None:
    unit = K * n * 4
    base = median_ms(samples[("-", "sum")])
    sum_peak, sum_steady = peaks[("-", "sum")]

    def extra(key: Key) -> tuple[float, float]:
        peak, steady = peaks[key]
        return (peak - sum_peak) / unit, (steady - sum_steady) / unit

    print("\nmedian ms per step; extra memory in k·n·4 bytes over sum's: peak over all steps, steady = steps 2..")
    print(f"{'agg':<8} {'method':<16} {'ms':>7} {'x sum':>6} {'extra':>7} {'steady':>7}")
    for key in samples:
        ms = median_ms(samples[key])
        print(f"{key[0]:<8} {key[1]:<16} {ms:>7.2f} {ms / base:>6.2f} {extra(key)[0]:>7.3f} {extra(key)[1]:>7.3f}")
    paths = balancer_paths(data.scenario)
    print(f"\nBalancer time / method time, per Balancer path; fwd+bwd and balance ms; target: {target_text(data)}")
    print(
        f"{'agg':<8} {'path':<16} {'/sum':>6} {'/torchjd':>9} {'/libmtl':>8} {'/pto':>6} {'fwd+bwd':>8} "
        f"{'balance':>8} {'extra':>7}  verdicts"
    )
    for path in paths:
        for agg in (a for a in AGGREGATORS if (a, path) in samples):
            own = median_ms(samples[(agg, path)])
            ratio = {m: own / median_ms(samples[(agg, m)]) if (agg, m) in samples else None for m in METHODS}
            torchjd = max(ratio["torchjd"] or 0.0, ratio["torchjd-gramopt"] or 0.0)  # vs the faster torchjd
            peak = extra((agg, path))[0]
            if data.scenario == "groups":
                time_verdict = verdict(own / base <= GROUPS_TARGET)
            else:  # the heads target is relative to torchjd, which has no GradNorm
                time_verdict = verdict(torchjd <= HEADS_TARGET) if torchjd else "n/a"
            cells = [f"{own / base:>5.2f}x", f"{torchjd:>8.2f}x" if torchjd else f"{'-':>9}"]
            cells += [f"{ratio[m]:>{w}.2f}x" if ratio[m] else f"{'-':>{w + 1}}" for m, w in (("libmtl", 7), ("pto", 5))]
            fb = median_ms(samples[(agg, path)], "forward_backward")
            balance = median_ms(samples[(agg, path)], "balance")
            print(
                f"{agg:<8} {path:<16} {' '.join(cells)} {fb:>8.2f} {balance:>8.2f} {peak:>7.3f}  "
                f"time {time_verdict}, memory {verdict(peak <= MEMORY_TARGET)}"
            )
    print(f"targets apply to the recommended path for this scenario: {paths[-1]}")


def target_text(data: Data) -> str:
    if data.scenario == "groups":
        return f"time <= {GROUPS_TARGET}x sum, extra <= {MEMORY_TARGET} k·n"
    return f"time <= {HEADS_TARGET}x the faster torchjd, extra <= {MEMORY_TARGET} k·n"


def run_scenario(cfg: Config, scenario: str, check_only: bool, aggregators: Sequence[str]) -> bool:
    data = make_data(cfg, scenario)
    n = sum(p.numel() for p in Net(cfg, data.heads).parameters())
    d_in, hidden, d_out = cfg.widths
    shape = f"trunk {d_in}-{hidden}-{d_out} + {data.heads} head(s) -> {cfg.classes}"
    split = f"batch {cfg.batch}" + (f" as {K} groups of {cfg.batch // K}" if scenario == "groups" else f", {K} tasks")
    print(f"\n== {scenario}: {shape}, {split}; n = {n:,}; k·n·4 bytes = {K * n * 4 / 2**20:.1f} MiB")
    keys = all_keys(data, aggregators)
    peaks = {} if check_only else measure_memory(data, keys, cfg.memory_steps)
    methods = {key: build(data, key) for key in keys}
    ok = check(data, methods) & check_gradnorm(data, methods)
    if not check_only:
        report(data, n, time_methods(cfg, methods), peaks)
    return ok


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The Balancer's aggregators against torchjd, LibMTL, pytorch-optimizer."
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps (smoke run)")
    parser.add_argument("--scenario", choices=("groups", "heads"), action="append", help="default: both")
    parser.add_argument("--aggregator", choices=AGGREGATORS, action="append", help="default: all")
    parser.add_argument("--check-only", action="store_true", help="only the first-step check, no timing")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"intra-op threads (default {THREADS})")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this thread's CPU time instead of the wall clock (with --threads 1: on a loaded "
        "machine, other processes' load then hardly counts; a CPU's whole step runs in this thread)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.thread_time if args.cpu_time else time.perf_counter
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    tuned = all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())
    clock = "CPU time of this thread" if args.cpu_time else "wall clock"
    print(
        f"{args.threads} thread(s), {clock}; Adam(lr=1e-3); k = {K}; {cfg.iters} interleaved timed steps per "
        f"method after {cfg.warmup} warm-up steps; medians. Allocator: "
        + (" ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items()) if tuned else "glibc defaults (not re-executed)")
    )
    print(f"memory: peak torch-allocated live bytes over the first {cfg.memory_steps} steps minus sum's")
    if args.quick:
        print("--quick: a smoke run of the benchmark's code; its numbers say nothing about speed")
    ok = True
    for scenario in args.scenario or ("groups", "heads"):
        ok &= run_scenario(cfg, scenario, args.check_only, args.aggregator or AGGREGATORS)
    print(f"\ncheck: {verdict(ok)}")
    print(f"total run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    raise SystemExit(main())
