"""Smoke test of ``benchmarks/many_groups.py --quick --markdown``: its ``main`` runs in-process (the
measurements themselves run in the worker subprocess it starts) and prints one row per (plugin, k)
with finite numbers and no note (a note is an error or a killed run), and one README row per
plugin; ``--cpu-time`` and ``--repeat`` run too. Times are never asserted (shared CI machines)."""

from __future__ import annotations

import importlib.util
import io
import math
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType

import pytest

from balancer.plugins import BUILTIN_PLUGINS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "many_groups.py"
PLUGINS = ("none", *(cls.name for cls in BUILTIN_PLUGINS))
GROUPS = (4, 8)  # the --quick configuration's k
COLUMNS = 8  # first s, steady ms, steps, balance ms, plugins ms, extra MiB, state KiB, peak MiB


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("many_groups_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    sys.path.insert(0, str(SCRIPT.parent))  # it imports benchmarks/overhead.py, as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(SCRIPT.parent))
    return module


def run_main(*argv: str) -> str:
    capture = io.StringIO()
    with redirect_stdout(capture):
        assert load_script().main(list(argv)) == 0
    return capture.getvalue()


@pytest.fixture(scope="module")
def output() -> str:
    return run_main("--quick", "--markdown")


def plain_rows(output: str) -> dict[tuple[str, int], list[str]]:
    rows: dict[tuple[str, int], list[str]] = {}
    for line in output.splitlines():
        cells = line.split()
        if len(cells) > COLUMNS and cells[0] in PLUGINS and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells[2:]
    return rows


def test_one_row_per_plugin_and_k(output: str) -> None:
    rows = plain_rows(output)
    assert set(rows) == {(p, k) for p in PLUGINS for k in GROUPS}
    noted = {key: " ".join(cells[COLUMNS:]) for key, cells in rows.items() if len(cells) > COLUMNS}
    assert noted == {}  # every run measured, none failed or was killed


@pytest.mark.parametrize("plugin", PLUGINS)
def test_numbers_are_finite(output: str, plugin: str) -> None:
    for k in GROUPS:
        first, steady, steps, balance, plugins, extra, state, peak = plain_rows(output)[(plugin, k)][:COLUMNS]
        done, planned = map(int, steps.split("/"))
        assert 1 <= done <= planned
        per_plugin = (plugins, state, peak)
        for cell in (first, steady.rstrip("*"), balance, extra) + (per_plugin if plugin != "none" else ()):
            assert re.fullmatch(r"-?\d+\.\d+", cell), (plugin, k, cell)
            assert math.isfinite(float(cell)), (plugin, k, cell)
        if plugin == "none":
            assert per_plugin == ("-", "-", "-")  # no plugin: no plugin time, state or peak
        else:
            assert float(plugins) > 0.0  # the plugin's methods ran and were timed


def test_markdown_table_has_a_row_per_plugin(output: str) -> None:
    table = [line for line in output.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| plugin (k=4 / k=8) | first step s |")
    names = [line.split(" | ")[0].lstrip("| ").strip("`") for line in table[2:]]
    assert names == ["no plugin", *PLUGINS[1:]]
    for line in table[2:]:
        cells = line.strip("| ").split(" | ")[1:]
        assert len(cells) == 6
        assert all(re.fullmatch(r"\S+ / \S+", cell) for cell in cells), line


def test_cpu_time_and_repeat() -> None:
    output = run_main("--quick", "--cpu-time", "--repeat", "2", "--plugins", "none,task_norm")
    assert "1 thread(s), times are the main thread's CPU time" in output
    best = output.split("best of 2 rounds")[1]
    rows = plain_rows(best)
    assert set(rows) == {(p, k) for p in ("none", "task_norm") for k in GROUPS}
    assert all(len(cells) == COLUMNS for cells in rows.values())
    assert all(math.isfinite(float(rows[(p, k)][1].rstrip("*"))) for p, k in rows)  # steady ms
