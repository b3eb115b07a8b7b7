"""Online class-incremental learning in GSA's recipe: does its replay-bias weight help?

Guo, Liu, Zhao, *Dealing with Cross-Task Class Discrimination in Online Continual Learning*
(GSA, CVPR 2023). MNIST-1D (Greydanus 2020; 20k samples generated offline by the ``mnist1d``
package, 16k train) arrives as 5 tasks of 2 classes, each seen once in batches of 10, with a
reservoir memory of 50, 100 or 200 samples. ER, GSA's objective with weights 1, and GSA's
objective with ``replay_bias`` run on the same seeds: see ``continual_stream/methods.py`` for
the recipe. A 40-256-256-10 MLP; a linear model scores about a third on MNIST-1D.

Run: ``python examples/online_continual.py`` (mnist1d needed: ``pip install mnist1d``; 10 seeds
x 3 memory sizes x 3 methods = 90 runs of 1,600 steps, single-threaded: 8 s a run on a free
core, up to 90 s on 2 busy ones, 54 min of run time here; ``--memories 100`` for a third of it);
``--quick`` runs sklearn's digits, 2 seeds, memory 100, in under a minute. Each run is appended
to ``<out>/runs.jsonl`` as it ends, and a rerun skips the runs found there (``--report-only``:
run nothing); then ``results.json`` (summary) and ``accuracy.png`` are written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual_stream.methods import METHODS, run  # noqa: E402
from continual_stream.report import plot, print_summary, summarize  # noqa: E402
from continual_stream.streams import digits_arrays, make_stream, mnist1d_arrays  # noqa: E402


def _finite(value):
    """NaN/inf as JSON null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--memories", type=int, nargs="+", default=[50, 100, 200], help="memory sizes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="digits, 2 seeds, memory 100: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("online-continual"), help="output folder")
    parser.add_argument("--report-only", action="store_true", help="summarise <out>/runs.jsonl, run nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.seeds, args.memories = "digits", 2, [100]
    torch.set_num_threads(1)  # a small MLP: threads only add synchronisation
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    config = {"dataset": args.dataset, "seeds": args.seeds, "memories": args.memories, "methods": args.methods}
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    runs = [r for r in runs if r["dataset"] == args.dataset]
    done = {(r["memory"], r["seed"], r["method"]) for r in runs}
    todo = [(s, m) for s in range(args.seeds) for m in args.memories]  # seed-major: every memory size advances
    todo = [(s, m) for s, m in todo if any((m, s, k) not in done for k in args.methods) and not args.report_only]
    arrays = (mnist1d_arrays() if args.dataset == "mnist1d" else digits_arrays()) if todo else {}
    start = time.perf_counter()
    for seed, memory in todo:  # methods inside: whatever has finished is paired
        data = make_stream(args.dataset, arrays, seed)
        for method in args.methods:
            if (memory, seed, method) in done:
                continue
            tic = time.perf_counter()
            result = {"dataset": args.dataset, "memory": memory, "seed": seed, "method": method}
            result |= run(method, data, seed, memory)
            result["seconds"] = time.perf_counter() - tic
            runs.append(result)
            with log.open("a") as f:
                f.write(json.dumps(_finite(result)) + "\n")
            print(f"memory {memory} seed {seed} {method}: {result['final_accuracy']:.3f}", flush=True)
    wanted = [
        r for r in runs if r["memory"] in args.memories and r["seed"] < args.seeds and r["method"] in args.methods
    ]
    summary = summarize(wanted)
    print_summary(summary)
    print(f"\n{len(wanted)} runs, {time.perf_counter() - start:.0f} s in this call")
    result = {"config": config, "summary": summary}
    (args.out / "results.json").write_text(json.dumps(_finite(result), indent=1))
    plot(wanted, args.out / "accuracy.png", memory=100 if 100 in args.memories else args.memories[0])
    return result


if __name__ == "__main__":
    main()
