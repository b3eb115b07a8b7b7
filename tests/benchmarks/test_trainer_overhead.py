"""Smoke test of ``benchmarks/trainer_overhead.py --quick``: its ``main`` runs in-process (the memory
measurements in the subprocesses it starts) and prints, for every k of the quick configuration, a
memory row and a time row whose ratios are positive numbers with a verdict. Times and the verdicts
themselves are never asserted (shared CI machines; the quick model is too small to mean anything)."""

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

pytest.importorskip("transformers")
pytest.importorskip("datasets")
# transformers' own deprecation notices, not this project's: the fixture runs under whichever test comes first
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer_overhead.py"
NUMBER = r"\d+\.\d+"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trainer_overhead_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def run() -> tuple[ModuleType, str]:
    module = load_script()
    capture = io.StringIO()
    with redirect_stdout(capture):
        assert module.main(["--quick"]) == 0
    return module, capture.getvalue()


def section(output: str, title: str) -> str:
    return output.split(f"\n{title}:")[1].split("\n\n")[0]


def test_memory_rows_hold_positive_ratios(run: tuple[ModuleType, str]) -> None:
    module, output = run
    rows = re.findall(
        rf"^\s*(\d+)\s+({NUMBER})\s+({NUMBER})\s+(-?{NUMBER})\s+({NUMBER})\s+(PASS|FAIL)$",
        section(output, "Memory"),
        re.M,
    )
    assert [int(row[0]) for row in rows] == list(module.QUICK.groups)
    for _, plain, balanced, _, analytic, _ in rows:
        assert float(plain) > 0 and float(balanced) > 0
        assert float(analytic) > 0  # the Balancer's [k, n] buffer, in units of k*n*4 bytes


def test_time_rows_hold_positive_ratios(run: tuple[ModuleType, str]) -> None:
    module, output = run
    row = rf"^\s*(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})x\s+({NUMBER})\s+({NUMBER})\s+(PASS|FAIL)$"
    rows = re.findall(row, section(output, "Time"), re.M)
    assert [int(row[0]) for row in rows] == list(module.QUICK.groups)
    for _, plain, balanced, ratio, plain_opt, balanced_opt, _ in rows:
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in (plain, balanced, ratio, plain_opt, balanced_opt))
        assert float(ratio) == pytest.approx(float(balanced) / float(plain), rel=0.01)
