"""examples/online_continual.py (GSA on digits) runs end to end in --quick mode; checks the output's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["finetune", "er", "er_rb", "gsa", "gsa_w1"]


def test_quick_run_writes_results_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    out, png = tmp_path / "results.json", tmp_path / "accuracy.png"
    cmd = [sys.executable, "examples/online_continual.py", "--quick", "--json", str(out), "--plot", str(png)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert png.stat().st_size > 10_000
    result = json.loads(out.read_text())
    assert result["config"] == {"seeds": 2, "methods": METHODS}
    for method in METHODS:
        runs = result["runs"][method]
        assert len(runs) == 2
        for run in runs:
            assert 0.0 <= run["final_accuracy"] <= 1.0
            assert len(run["accuracy_matrix"]) == 5 and all(len(row) == 5 for row in run["accuracy_matrix"])
            assert len(run["accuracy_new_after_task"]) == 5 and len(run["ant_trace"]) == 5
        row = result["summary"][method]
        for key in ("final_accuracy", "forgetting", "old_new_confusion", "ant_old", "ant_new"):
            assert len(row[key]) == 2, key  # mean, std
        assert len(row["accuracy_old_after_task"]) == 5
    assert "gsa - gsa_w1: final_accuracy" in result["summary"]["paired"]
    assert "ER + replay_bias (GSA)" in proc.stdout
