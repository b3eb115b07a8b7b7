"""Smoke test of ``benchmarks/vs_anchors.py --quick``: it runs, prints every table, and the
first-step check agrees with the anchors. Times are never asserted (shared CI machines)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_anchors.py"
AGGREGATORS = ("upgrad", "mgda", "pcgrad")


@pytest.fixture(scope="module")
def output() -> str:
    pytest.importorskip("torchjd")
    pytest.importorskip("pytorch_optimizer")
    if importlib.util.find_spec("LibMTL") is None:
        pytest.skip("LibMTL is not installed (`pip install --no-deps LibMTL==1.1.5`).")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_runs_under_the_tuned_allocator(output: str) -> None:
    assert "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736" in output


@pytest.mark.parametrize("scenario", ["groups", "heads"])
def test_prints_both_tables_per_scenario(output: str, scenario: str) -> None:
    section = output.split(f"== {scenario}:")[1].split("\n== ")[0]
    for aggregator in AGGREGATORS:
        # one time/memory row per method, then one ratio row with both verdicts
        assert re.search(rf"^{aggregator}\s+balancer\s+[\d.]+\s+[\d.]+\s+-?[\d.]+\s+-?[\d.]+$", section, re.M)
        for path in ("balancer", "balancer-tasks") + (("balancer-samples",) if scenario == "groups" else ()):
            ratio_row = rf"^{aggregator}\s+{path}\s+[\d.]+x\s+[\d.]+x.*time (PASS|FAIL), memory (PASS|FAIL)$"
            assert re.search(ratio_row, section, re.M)
    assert re.search(r"^-\s+sum\s+", section, re.M)
    assert re.search(r"^pcgrad\s+pto\s+", section, re.M)
    assert re.search(r"^mgda\s+libmtl\s+", section, re.M)


def test_every_method_computes_the_same_update(output: str) -> None:
    checks = re.findall(r"^  (\w+)\s+(\S+)\s+vs .*\s([\d.e+-]+)\s+(PASS|FAIL) \(tol", output, re.M)
    # per scenario: 3 upgrad, 5 mgda, 6 pcgrad (balancer, balancer-tasks + anchors); groups adds balancer-samples
    assert len(checks) == 2 * 14 + 3
    assert {a for a, *_ in checks} == set(AGGREGATORS)
    assert [c for c in checks if c[3] != "PASS"] == []
    assert "\ncheck: PASS\n" in output
