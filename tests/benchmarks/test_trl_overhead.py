"""Smoke test of ``benchmarks/trl_overhead.py --quick``: every table has its variants with positive,
finite medians, and the printed rows carry the ratios and the tap-only verdict. Times and verdicts
themselves are never asserted (shared CI machines; the quick model is too small to mean anything)."""

from __future__ import annotations

import importlib.util
import io
import math
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trl_overhead.py"


def test_quick_run_prints_every_row() -> None:
    spec = importlib.util.spec_from_file_location("trl_overhead_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        printed = io.StringIO()
        with redirect_stdout(printed):
            tables = module.main(["--quick"])
    finally:
        del sys.modules[spec.name]
    assert list(tables) == ["DPO", "GRPO k=2", "GRPO k=4"]
    assert list(tables["DPO"]) == ["plain", "prob (taps)", "norm (groups)"]
    assert list(tables["GRPO k=4"]) == ["plain", "task_norm, k=4"]
    for table in tables.values():
        for step, inner in table.values():
            assert math.isfinite(step) and 0 < inner <= step
    output = printed.getvalue()
    assert re.search(r"^prob \(taps\)\s+\d+\.\d\s+\d+\.\d+x .* <= 1\.05x (PASS|FAIL)$", output, re.M)
    assert len(re.findall(r"report: \+-?\d+ ms in training_step", output)) == 3
