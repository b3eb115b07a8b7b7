"""What a combine rule costs: ``opt.step()`` time with ``k`` groups on a 1M-parameter model.

Each step captures ``k`` groups (not timed), then ``step()`` is timed: statistics, plugins, the
combination (one GEMV, or the rule tile by tile) and the inner SGD step. Printed: the median time
of each setting and its ratio to the plain step (no plugin, the GEMV), and the same with clipping
(the rule's norm is measured on the written update: one more pass). Ratios use the fastest step
(a shared machine's other load only adds time).

    python benchmarks/combine_rules.py [--params 1000000] [--groups 4] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from balancer import Balancer


def _model(params: int, device: str) -> torch.nn.Module:
    width = 1000
    depth = max(1, params // (width * width + width))
    layers = [torch.nn.Linear(width, width) for _ in range(depth)]
    return torch.nn.Sequential(*layers).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(plugins: list, args: argparse.Namespace, clip: float | None) -> tuple[float, float]:
    torch.manual_seed(0)
    model = _model(args.params, args.device)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1e-6), plugins=plugins, max_grad_norm=clip)
    x = torch.randn(8, 1000, device=args.device)
    times = []
    for step in range(args.steps + 3):
        for g in range(args.groups):
            with opt.group(f"g{g}"):
                model(x * (g + 1)).square().mean().backward()
        _sync(args.device)
        start = time.perf_counter()
        opt.step()
        _sync(args.device)
        if step >= 3:
            times.append(time.perf_counter() - start)
        opt.zero_grad()
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n = sum(p.numel() for p in _model(args.params, "cpu").parameters())
    print(f"{n} parameters, k = {args.groups}, device {args.device}")
    settings = {"plain (GEMV)": [], "trimmed_mean": [("trimmed_mean", {"trim_number": 1})], "graddrop": ["graddrop"]}
    for clip in (None, 1.0):
        base = None
        for label, plugins in settings.items():
            best, median = time_step(plugins, args, clip)
            base = base or best
            print(
                f"clip={clip!s:5} {label:14} step min {best * 1e3:8.2f} ms "
                f"(median {median * 1e3:8.2f})  x{best / base:5.2f}"
            )


if __name__ == "__main__":
    main()
