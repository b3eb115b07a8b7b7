"""examples/trl_dpo.py runs a few steps: the three runs train through BalancedDPOTrainer, the plain run
measures both sides, the norm rule equalises them and the prob rule acts at the taps (numbers, not just a run)."""

from __future__ import annotations

import importlib.util
import io
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "trl_dpo.py"


def test_three_runs_measure_and_balance_chosen_and_rejected() -> None:
    spec = importlib.util.spec_from_file_location("example_trl_dpo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed = io.StringIO()
    with redirect_stdout(printed):
        logs = module.main(["--steps", "3"])
    assert set(logs) == {"DPO", "norm", "prob"}
    assert all(len(run) == 3 for run in logs.values())
    plain = logs["DPO"][0]
    assert plain["balancer/weight/chosen"] == plain["balancer/weight/rejected"] == 1.0
    for entry in logs["norm"]:  # the norm rule brings both sides to their mean norm
        balanced_w = entry["balancer/weight/chosen"] * entry["balancer/norm/chosen"]
        balanced_l = entry["balancer/weight/rejected"] * entry["balancer/norm/rejected"]
        assert balanced_w == pytest.approx(balanced_l, rel=1e-6)
    assert all(entry["balancer/balanced_dpo/prob_factor"] > 0 for entry in logs["prob"])
    assert "balancer/norm/chosen" not in logs["prob"][0]  # one backward pass: no groups
    rows = printed.getvalue().splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["DPO", "norm", "prob"]
    assert all(math.isfinite(float(row.split()[-1])) for row in rows)
