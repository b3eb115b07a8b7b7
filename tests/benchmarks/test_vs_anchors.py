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
AGGREGATORS = ("upgrad", "mgda", "pcgrad", "fairgrad", "config", "gradnorm")


@pytest.fixture(scope="module")
def output() -> str:
    pytest.importorskip("torchjd")
    pytest.importorskip("pytorch_optimizer")
    if importlib.util.find_spec("LibMTL") is None:
        pytest.skip("LibMTL is not installed (`pip install --no-deps LibMTL==1.1.5`).")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600, check=False
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
        # torchjd has no GradNorm: no ratio to it, and no verdict for the heads target, which is relative to it
        no_torchjd = aggregator == "gradnorm"
        torchjd = "-" if no_torchjd else r"[\d.]+x"
        time_verdict = "n/a" if no_torchjd and scenario == "heads" else "PASS|FAIL"
        for path in ("balancer", "balancer-tasks") + (("balancer-samples",) if scenario == "groups" else ()):
            ratio_row = rf"^{aggregator}\s+{path}\s+[\d.]+x\s+{torchjd}\s.*time ({time_verdict}), memory (PASS|FAIL)$"
            assert re.search(ratio_row, section, re.M)
    assert re.search(r"^-\s+sum\s+", section, re.M)
    assert re.search(r"^pcgrad\s+pto\s+", section, re.M)
    for aggregator in ("mgda", "gradnorm"):
        assert re.search(rf"^{aggregator}\s+libmtl\s+", section, re.M)
    assert re.search(r"^fairgrad\s+torchjd-gramopt\s+", section, re.M)
    assert re.search(r"^config\s+torchjd\s+", section, re.M)
    assert not re.search(r"^config\s+torchjd-gramopt\s+", section, re.M)  # ConFIG is not Gramian-based
    assert not re.search(r"^gradnorm\s+torchjd", section, re.M)


def test_every_method_computes_the_same_update(output: str) -> None:
    checks = re.findall(r"^  (\w+)\s+(\S+)\s+vs .*\s([\d.e+-]+)\s+(PASS|FAIL) \(tol", output, re.M)
    # per scenario, balancer and balancer-tasks + anchors: 3 upgrad, 5 mgda, 6 pcgrad, 4 fairgrad, 3 config, and
    # 3 gradnorm with two lines each (updates, weights); groups adds balancer-samples to each aggregator
    assert len(checks) == 2 * 27 + 7
    assert {a for a, *_ in checks} == set(AGGREGATORS)
    assert [c for c in checks if c[3] != "PASS"] == []
    assert "\ncheck: PASS\n" in output


def test_gradnorm_is_checked_over_its_first_steps(output: str) -> None:
    """Updates and learned weights against the float64 replay, for every method, in both scenarios."""
    for scenario in ("groups", "heads"):
        section = output.split(f"== {scenario}:")[1].split("\n== ")[0]
        methods = ("balancer", "balancer-tasks", "libmtl") + (("balancer-samples",) if scenario == "groups" else ())
        for method in methods:
            trunk = r" \(trunk\)" if scenario == "heads" and method == "libmtl" else ""
            for what in ("update 1-5", "Δw 2-5"):
                line = rf"^  gradnorm\s+{method}\s+vs GradNorm f64, {what}{trunk}\s+[\d.e+-]+\s+PASS"
                assert re.search(line, section, re.M), (method, what)
