"""Overhead of the Balancer under DeepSpeed ZeRO-2 over plain gradient accumulation, on 2 ranks.

What is compared, for k = 2 and 4 groups, on an MLP of about 3.5M parameters (512-1536-1536-256,
the exact count is printed) trained with AdamW on 2 CPU processes (gloo, one thread each):

* plain: ``gradient_accumulation_steps = k``; each step is DeepSpeed's own accumulation loop,
  ``engine(x)``, ``engine.backward(loss)``, ``engine.step()`` for each of the k sub-batches (only
  the k-th ``engine.step()`` updates). ZeRO-2 reduce-scatters every micro-step either way.
* balancer: ``gradient_accumulation_steps = 1`` and the k passes each inside
  ``with opt.group(f"g{i}")``, then ``opt.step()`` (Gram matrix of the local partitions, one
  all-reduce, ``task_norm``, the weighted combination written back, ``engine.step()``) and
  ``opt.zero_grad()``.

Time: both engines live in one process pair; after warm-up they take steps in turn (the order
alternates every round) and each step's time is the slower rank's (an all-reduce of the
durations). The ratio is the median over rounds of balancer/plain within a round (the two steps
of a round run back to back, so a slow spell of the machine hits both), target <= 1.1x; the
median step times are printed next to it.

Memory: every (k, run) pair runs 2 + 4 steps in its own ``torchrun``; each rank reports how far
its peak RSS (``VmHWM``) rose above its RSS once the engine was built: "steady" is the peak of the
last 4 steps, "whole" the peak of all 6 (the first steps also allocate DeepSpeed's and AdamW's
lazy buffers, which makes that figure noisier by a few MB from run to run). Each column is that
rise for the balancer minus the rise for plain DeepSpeed, on the worse rank, in units of
``k x local partition`` (``k * partition elements * 4`` bytes); the target, <= 1.1, is checked on
"steady", and the analytic ``opt.backend.extra_bytes()`` is printed in the same unit. RSS carries
a few MB of run-to-run noise (allocator arenas, communication threads), which only ever adds: each
memory run is made three times and each rank's lowest figure kept. As in ``benchmarks/overhead.py``,
memory runs use ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live tensors (timing runs
keep malloc's default, which is what training uses).

PASS/FAIL is printed per row; the script exits 0 either way. Run (it starts torchrun itself)::

    python benchmarks/zero_overhead.py           # about 3 minutes on 2 idle cores
    python benchmarks/zero_overhead.py --quick   # tiny MLP, smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

TIME_TARGET = 1.1
MEMORY_TARGET = 1.1
MEMORY_REPEATS = 3
FULL = {"widths": [512, 1536, 1536, 256], "batch": 64, "ks": [2, 4], "warmup": 3, "iters": 40, "memory_steps": (2, 4)}
QUICK = {"widths": [32, 64, 10], "batch": 8, "ks": [2], "warmup": 1, "iters": 3, "memory_steps": (1, 1)}


# -- worker side (under torchrun) ------------------------------------------------------------
def _engine(cfg: dict, k: int, run: str):
    import torch

    from balancer.integrations.deepspeed import initialize

    torch.manual_seed(0)
    widths = cfg["widths"]
    layers = [m for a, b in pairwise(widths) for m in (torch.nn.Linear(a, b), torch.nn.ReLU())][:-1]
    model = torch.nn.Sequential(*layers)
    ds = {
        "train_micro_batch_size_per_gpu": cfg["batch"],
        "gradient_accumulation_steps": k if run == "plain" else 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 2},
    }
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if run == "plain":
        import deepspeed

        return deepspeed.initialize(model=model, optimizer=adamw, config=ds)[0], None
    engine, opt, _, _ = initialize(model=model, optimizer=adamw, config={**ds, "balancer": {"plugins": ["task_norm"]}})
    return engine, opt


def _batches(cfg: dict, k: int, rank: int):
    import torch

    gen = torch.Generator().manual_seed(1 + rank)
    widths = cfg["widths"]
    return [
        (torch.randn(cfg["batch"], widths[0], generator=gen), torch.randint(widths[-1], (cfg["batch"],), generator=gen))
        for _ in range(k)
    ]


def _step(engine, opt, batches) -> None:
    import torch

    for i, (x, y) in enumerate(batches):
        if opt is None:
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()  # a no-op update until the k-th micro-step: DeepSpeed's accumulation loop
        else:
            with opt.group(f"g{i}"):
                engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
    if opt is not None:
        opt.step()
        opt.zero_grad()


def _timed_step(engine, opt, batches) -> float:
    import torch
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    _step(engine, opt, batches)
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds.item())


def _status(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status``, in bytes (reported in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Resets ``VmHWM`` to the current RSS, so that the peak of what follows can be read."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(what: str, cfg: dict, k: int, run: str, out: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(40)
    deepspeed.init_distributed()
    rank = dist.get_rank()
    if what == "time":
        result: dict = {}
        for kk in cfg["ks"]:
            runs = {name: _engine(cfg, kk, name) for name in ("plain", "balancer")}
            batches = _batches(cfg, kk, rank)
            for engine, opt in runs.values():
                for _ in range(cfg["warmup"]):
                    _step(engine, opt, batches)
            samples: dict[str, list[float]] = {name: [] for name in runs}
            for i in range(cfg["iters"]):
                for name in ("plain", "balancer") if i % 2 == 0 else ("balancer", "plain"):
                    samples[name].append(_timed_step(*runs[name], batches))
            result[str(kk)] = {name: statistics.median(s) for name, s in samples.items()}
            pairs = zip(samples["balancer"], samples["plain"], strict=True)  # the two steps of one round
            result[str(kk)]["ratio"] = statistics.median(bal / plain for bal, plain in pairs)
            result["params"] = sum(p.numel() for p in runs["plain"][0].module.parameters())
    else:
        engine, opt = _engine(cfg, k, run)
        batches = _batches(cfg, k, rank)
        first, later = cfg["memory_steps"]
        _reset_peak()
        start = _status("VmRSS")  # the engine is built (and, for the balancer, its plugins imported)
        for _ in range(first):
            _step(engine, opt, batches)
        whole = _status("VmHWM")
        _reset_peak()
        for _ in range(later):
            _step(engine, opt, batches)
        steady = _status("VmHWM")
        partition = int(sum(engine.optimizer.partition_size))
        extra = opt.backend.extra_bytes() if opt is not None else 0
        result = {
            "steady": steady - start,
            "whole": max(whole, steady) - start,
            "partition": partition,
            "extra_bytes": extra,
        }
    (out / f"{what}_{run}_{k}_{rank}.json").write_text(json.dumps(result))
    dist.barrier()


# -- parent side -----------------------------------------------------------------------------------
def _torchrun(args: list[str], out: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if (
        args[0] == "memory"
    ):  # every tensor its own mapping: RSS follows live tensors (timing runs keep malloc's default)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    proc = subprocess.run(
        [*cmd, __file__, "--worker", *args, "--out", str(out)], check=False, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _lowest(repeats: list[dict]) -> dict:
    """One rank's memory figures, the lowest of the repeated runs (RSS noise only ever adds)."""
    return {key: min(r[key] for r in repeats) for key in repeats[0]}


def _read(out: Path, what: str, run: str, k: int) -> list[dict]:
    return [json.loads((out / f"{what}_{run}_{k}_{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP, few iterations (smoke run)")
    parser.add_argument("--worker", nargs=3, metavar=("WHAT", "K", "RUN"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.worker:
        what, k, run = args.worker
        worker(what, cfg, int(k), run, args.out)
        return
    import tempfile

    flag = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _torchrun(["time", "0", "both", *flag], out)
        memory: dict[tuple[int, str], list[dict]] = {}
        for k in cfg["ks"]:
            for run in ("plain", "balancer"):
                repeats = []
                for _ in range(MEMORY_REPEATS):
                    _torchrun(["memory", str(k), run, *flag], out)
                    repeats.append(_read(out, "memory", run, k))
                memory[k, run] = [_lowest([rep[rank] for rep in repeats]) for rank in range(2)]
        timing = _read(out, "time", "both", 0)[0]
        print(f"DeepSpeed ZeRO-2, 2 ranks, MLP {cfg['widths']} ({timing['params']:,} parameters), AdamW, task_norm")
        print("time: median step of the slower rank; memory: extra peak RSS, in units of k x local partition (fp32)")
        print(
            f"{'k':>3} {'plain ms':>9} {'bal. ms':>9} {'ratio':>7} {'time':>5}"
            f"  {'steady':>7} {'whole':>7} {'analytic':>9} {'mem':>5}"
        )
        for k in cfg["ks"]:
            plain, bal = timing[str(k)]["plain"] * 1e3, timing[str(k)]["balancer"] * 1e3
            ratio = timing[str(k)]["ratio"]
            base, ours = memory[k, "plain"], memory[k, "balancer"]
            unit = k * ours[0]["partition"] * 4
            steady, whole = (
                max(b[key] - p[key] for b, p in zip(ours, base, strict=True)) / unit for key in ("steady", "whole")
            )
            analytic = ours[0]["extra_bytes"] / unit
            time_ok = "PASS" if ratio <= TIME_TARGET else "FAIL"
            mem_ok = "PASS" if steady <= MEMORY_TARGET else "FAIL"
            print(
                f"{k:>3} {plain:>9.1f} {bal:>9.1f} {ratio:>6.3f}x {time_ok:>5}"
                f"  {steady:>7.3f} {whole:>7.3f} {analytic:>9.3f} {mem_ok:>5}"
            )
        print(f"targets: time <= {TIME_TARGET}x, extra memory <= {MEMORY_TARGET} x k x local partition")


if __name__ == "__main__":
    main()
