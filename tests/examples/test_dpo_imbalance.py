"""Smoke test of ``examples/experiments/dpo_imbalance.py --quick``: it runs, checks the DPO split, writes the
JSON, the tables and the figure, and a seed gives the same numbers when rerun. Wall-clock times
are never asserted (shared CI machines)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "experiments" / "dpo_imbalance.py"
SETTINGS = ("discrete", "autoregressive")
METHODS = ("dpo", "norm", "prob_chosen", "prob_chosen_floor", "prob_rejected")
FINAL_KEYS = {
    "logp_chosen",
    "logp_rejected",
    "delta_logp_chosen",
    "delta_logp_rejected",
    "ood_mass",
    "expected_reward",
    "kl",
    "reward_margin",
    "reward_accuracy",
    "reward_vs_dpo_same_kl",
    "grad_ratio_raw",
    "grad_ratio_applied",
    "mean_chosen_weight",
    "mean_rejected_weight",
    "chosen_factor_min",
    "chosen_factor_max",
    "rejected_factor_min",
    "rejected_factor_max",
}


def _run(out: Path, seeds: int) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seeds", str(seeds), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("dpo_imbalance")
    done = _run(out, seeds=2)
    return done.stdout, json.loads((out / "results.json").read_text()), out


def test_the_dpo_split_check_passed(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS:
        check = results[setting]["split_check"]
        assert check["passed"] is True
        assert check["max_abs_err"] <= check["rtol"] * check["max_abs_grad"]


def test_json_holds_every_seed_of_every_method(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    assert results["seeds"] == 2 and results["beta"] == 0.1
    for setting in SETTINGS:
        runs = results[setting]["runs"]
        assert set(runs) == set(METHODS) == set(results[setting]["summary"])
        steps = results[setting]["config"]["steps"]
        for method in METHODS:
            assert [r["seed"] for r in runs[method]] == [0, 1]
            for r in runs[method]:
                assert FINAL_KEYS <= set(r["final"])
                assert all(math.isfinite(v) for v in r["final"].values())
                curves = r["curves"]
                assert curves["step"][0] == 0 and curves["step"][-1] == steps
                assert all(len(v) == len(curves["step"]) for v in curves.values())
                assert len(r["grads"]["chosen_norm"]) == len(r["grads"]["rejected_weight"]) == steps
                assert ("prob_factor" in r["final"]) == method.startswith("prob")
            summary = results[setting]["summary"][method]
            assert all(len(v) == 2 for v in summary.values())


def test_weights_follow_each_rule(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS:
        runs = results[setting]["runs"]
        for r in runs["dpo"] + runs["prob_chosen"] + runs["prob_chosen_floor"] + runs["prob_rejected"]:
            assert set(r["grads"]["chosen_weight"]) == set(r["grads"]["rejected_weight"]) == {1.0}
        for r in runs["norm"]:  # alpha = 1, no EMA: equal applied norms every step
            assert r["final"]["grad_ratio_applied"] == pytest.approx(1.0, rel=1e-9)
        for r in runs["dpo"]:
            assert r["final"]["reward_vs_dpo_same_kl"] == 0.0


def _factors(r: dict[str, Any], side: str) -> tuple[float, float]:
    return r["final"][f"{side}_factor_min"], r["final"][f"{side}_factor_max"]


def test_only_the_prob_rule_rescales_at_the_taps_and_only_its_side(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS:
        runs = results[setting]["runs"]
        for r in runs["dpo"] + runs["norm"]:
            assert _factors(r, "chosen") == _factors(r, "rejected") == (1.0, 1.0)
        for r in runs["prob_chosen"]:
            assert _factors(r, "rejected") == (1.0, 1.0)
            assert _factors(r, "chosen")[1] <= 2.0 * (1 + 1e-6)  # min(C, π_w/π_l), C = 2
        for r in runs["prob_chosen_floor"]:
            assert _factors(r, "rejected") == (1.0, 1.0)
            low, high = _factors(r, "chosen")
            assert low >= 0.5 * (1 - 1e-6) and high <= 2.0 * (1 + 1e-6)  # clamp(π_w/π_l, 1/C, C)
        for r in runs["prob_rejected"]:
            assert _factors(r, "chosen") == (1.0, 1.0)
            assert _factors(r, "rejected") != (1.0, 1.0)


def test_prints_tables_and_writes_the_figure(run: tuple[str, dict[str, Any], Path]) -> None:
    stdout, _, out = run
    for setting in SETTINGS:
        section = stdout.split(f"### {setting}:")[1].split("\n### ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
        assert len(rows) == 1 + len(METHODS)  # header + one row per method
        assert rows[0].count("|") == rows[1].count("|") == 11
    assert (out / "dpo-logprobs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seed_gives_the_same_numbers_when_rerun(run: tuple[str, dict[str, Any], Path], tmp_path: Path) -> None:
    _, results, _ = run
    _run(tmp_path, seeds=1)
    again = json.loads((tmp_path / "results.json").read_text())
    for setting in SETTINGS:
        for method in METHODS:
            first, second = results[setting]["runs"][method][0], again[setting]["runs"][method][0]
            assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
