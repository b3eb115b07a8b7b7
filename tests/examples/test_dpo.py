"""examples/dpo.py, the short DPO example, runs with both rules and learns the preference."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "dpo.py"


def _load():
    spec = importlib.util.spec_from_file_location("example_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rule", ["norm", "prob"])
def test_short_dpo_example_runs(rule, capsys):
    metrics = _load().main(["--rule", rule, "--steps", "15"])
    assert "('chosen', 'rejected')" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] == 1.0
