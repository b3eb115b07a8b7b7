"""The ``balancer`` command: ``plugins``, ``config-schema`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .config import config_schema
from .errors import BalancerError
from .registry import list_plugins


def _cmd_plugins(args: argparse.Namespace) -> int:
    infos = list_plugins()
    if args.json:
        rows = [
            {"name": i.name, "distribution": i.distribution, "version": i.version, "summary": i.summary}
            for i in infos
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
    print(json.dumps(config_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(steps=args.steps, seed=args.seed, plugins=args.plugins)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancer", description="Per-group gradient balancing for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list the available plugins with their distribution and version")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_plugins)
    s = sub.add_parser("config-schema", help="print the JSON schema of the 'balancer' config section")
    s.set_defaults(func=_cmd_schema)
    d = sub.add_parser("demo", help="two tasks of different gradient scale, with and without balancing")
    d.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--plugins", default="task_norm", help="comma-separated plugins for the balanced run")
    d.set_defaults(func=_cmd_demo)
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
