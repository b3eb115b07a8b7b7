"""The ``balancer`` command: ``plugins``, ``config-schema``, ``demo``, ``report`` and ``--version``.

Each command imports what it needs when it runs (torch, pydantic, matplotlib), so that
``balancer --help`` and ``balancer --version`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from balancer.errors import BalancerError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradient-balancer")
    except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
        return "0+unknown"


def _cmd_plugins(args: argparse.Namespace) -> int:
    from balancer.contract.registry import list_plugins

    infos = list_plugins()
    if args.json:
        rows = [
            {"name": i.name, "distribution": i.distribution, "version": i.version, "summary": i.summary} for i in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not infos:
        print("No plugins found.")
        return 0
    header = ("name", "distribution", "version", "summary")
    rows_t = [(i.name, i.distribution, i.version, i.summary) for i in infos]
    widths = [max(len(str(r[c])) for r in [header, *rows_t]) for c in range(3)]
    for row in [header, *rows_t]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from balancer.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from balancer.demo.run import run_demo

    return run_demo(
        steps=args.steps,
        seed=args.seed,
        plugins=args.plugins,
        out=args.out,
        quick=args.quick,
        loss_norm=args.loss_norm,
        threads=args.threads,
        setting=args.setting,
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from balancer.tools.report import write_report

    try:
        out = write_report(args.log, args.output, smooth=args.smooth)
    except (OSError, ValueError) as exc:
        print(f"balancer report: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {out}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, found {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancer", description="Per-group gradient balancing for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list the available plugins with their distribution and version")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_plugins)
    s = sub.add_parser("config-schema", help="print the JSON schema of the 'balancer' config section")
    s.set_defaults(func=_cmd_schema)
    d = sub.add_parser(
        "demo", help="multi-task GRPO: the per-task gradient imbalance of Wu et al., without and with balancing"
    )
    d.add_argument("--steps", type=_positive_int, help="optimizer steps per run (default 600; 24 with --quick)")
    d.add_argument("--seed", type=int, default=0, help="same seed, same metrics (default 0)")
    d.add_argument(
        "--plugins", default="task_norm", help="comma-separated plugins for the balanced run (default task_norm)"
    )
    d.add_argument(
        "--out", default="balancer-demo", help="folder for metrics.jsonl and report.png (default ./balancer-demo)"
    )
    d.add_argument("--quick", action="store_true", help="tiny batches and few steps: a smoke test")
    d.add_argument(
        "--setting",
        choices=("nature", "length"),
        default="nature",
        help="tasks that differ by nature, 2-token answers (default), or by answer length (8, 1, 1 tokens)",
    )
    d.add_argument(
        "--loss-norm",
        choices=("sequence", "token"),
        default=None,
        help="sum (sequence) or average (token) of each response's token losses "
        "(default: token for --setting nature, sequence for --setting length)",
    )
    d.add_argument("--threads", type=_positive_int, default=1, help="torch threads while training (default 1)")
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser("report", help="plot a metrics log into a PNG: a column per task, every run on the same axes")
    r.add_argument("log", help="a metrics.jsonl written by balancer.tools.metrics.MetricsLogger or balancer demo")
    r.add_argument("-o", "--output", default="report.png", help="the PNG to write (default report.png)")
    r.add_argument("--smooth", type=_positive_int, help="moving-average window in steps (default: 1/15 of the run)")
    r.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; a user error (bad plugin name, invalid options) prints its message and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BalancerError as exc:
        print(f"balancer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
