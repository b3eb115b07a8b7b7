"""Smoke test of ``examples/experiments/dpo_imbalance.py --quick``: it runs, checks the DPO split, writes the
JSON, the tables and the figure; the rules act as documented and the paired differences are what
the per-seed runs give. Wall-clock times are never asserted (shared CI machines)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "experiments" / "dpo_imbalance.py"
SETTINGS = ("disjoint β=0.1", "disjoint β=1", "autoregressive β=0.1")
METHODS = ("dpo", "norm", "prob_chosen", "prob_chosen_floor", "prob_rejected")
FINAL_KEYS = {
    "delta_logp_chosen",
    "delta_logp_rejected",
    "ood_mass",
    "expected_reward",
    "kl",
    "reward_margin",
    "matched_kl",
    "matched_kl_gain",
    "grad_ratio_raw",
    "grad_ratio_applied",
    "chosen_factor_min",
    "chosen_factor_max",
    "rejected_factor_min",
    "rejected_factor_max",
}
DISCRETE_KEYS = {
    "chosen_mass",
    "rejected_mass",
    "frontier_gap",
    "ood_implicit_corr",
    "ood_implicit_reward",
    "ood_minus_chosen_implicit",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("dpo_imbalance")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seeds", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads((out / "results.json").read_text()), out


def test_the_dpo_split_check_passed(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS:
        check = results["settings"][setting]["split_check"]
        assert check["passed"] is True
        assert check["max_abs_err"] <= check["rtol"] * check["max_abs_grad"]


def test_json_holds_every_seed_of_every_method(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    assert results["seeds"] == 2 and set(results["settings"]) == set(SETTINGS)
    for setting in SETTINGS:
        result = results["settings"][setting]
        assert result["beta"] == (1.0 if "β=1" in setting else 0.1)
        keys = FINAL_KEYS | (DISCRETE_KEYS if setting.startswith("disjoint") else set())
        for method in METHODS:
            runs = result["runs"][method]
            assert [r["seed"] for r in runs] == [0, 1]
            for r in runs:
                assert keys <= set(r["final"])
                assert all(math.isfinite(v) for v in r["final"].values())
                curves = r["curves"]
                assert curves["step"][0] == 0 and curves["step"][-1] == result["config"]["steps"]
                assert all(len(v) == len(curves["step"]) for v in curves.values())
                assert curves["kl"][0] == pytest.approx(0.0, abs=1e-12)
                if "frontier_gap" in r["final"]:
                    assert r["final"]["frontier_gap"] >= -1e-9  # nothing beats the best policy at its KL
            assert all(len(v) == 2 for v in result["stats"]["summary"][method].values())


def test_disjoint_sets_and_the_overlap_of_the_earlier_setting(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS[:2]:
        assert all(t["chosen_overlap"] == 0.0 for t in results["settings"][setting]["task"])
    for values in results["overlap_setting"].values():
        assert values["chosen_overlap"][0] > 0.5


def test_paired_differences_are_per_seed_differences(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS:
        result = results["settings"][setting]
        dpo = result["runs"]["dpo"]
        for r in dpo:
            assert r["final"]["matched_kl_gain"] == 0.0 and r["final"]["matched_kl"] == r["final"]["kl"]
        for method in METHODS[1:]:
            diffs = [
                r["final"]["expected_reward"] - d["final"]["expected_reward"]
                for r, d in zip(result["runs"][method], dpo, strict=True)
            ]
            mean, sd = result["stats"]["paired"][method]["expected_reward"]
            assert mean == pytest.approx(sum(diffs) / 2, rel=1e-12, abs=1e-15)
            assert sd == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2), rel=1e-9, abs=1e-15)


def test_weights_and_tap_factors_follow_each_rule(run: tuple[str, dict[str, Any], Path]) -> None:
    _, results, _ = run
    for setting in SETTINGS:
        runs = results["settings"][setting]["runs"]
        for method in ("dpo", "prob_chosen", "prob_chosen_floor", "prob_rejected"):
            for r in runs[method]:
                assert set(r["grads"]["chosen_weight"]) == set(r["grads"]["rejected_weight"]) == {1.0}
        for r in runs["norm"]:  # alpha = 1, no EMA: equal applied norms every step
            assert r["final"]["grad_ratio_applied"] == pytest.approx(1.0, rel=1e-9)
        factors = {
            m: [
                (
                    r["final"]["chosen_factor_min"],
                    r["final"]["chosen_factor_max"],
                    r["final"]["rejected_factor_min"],
                    r["final"]["rejected_factor_max"],
                )
                for r in runs[m]
            ]
            for m in METHODS
        }
        for low_w, high_w, low_l, high_l in factors["dpo"] + factors["norm"]:
            assert (low_w, high_w, low_l, high_l) == (1.0, 1.0, 1.0, 1.0)
        for _, high_w, low_l, high_l in factors["prob_chosen"] + factors["prob_chosen_floor"]:
            assert (low_l, high_l) == (1.0, 1.0) and high_w <= 2.0 * (1 + 1e-6)  # min(C, π_w/π_l), C = 2
        for low_w, _, _, _ in factors["prob_chosen_floor"]:
            assert low_w >= 0.5 * (1 - 1e-6)  # the floor 1/C
        for low_w, high_w, low_l, high_l in factors["prob_rejected"]:
            assert (low_w, high_w) == (1.0, 1.0) and 0.5 * (1 - 1e-6) <= low_l <= high_l <= 2.0 * (1 + 1e-6)


def test_prints_tables_and_writes_the_figure(run: tuple[str, dict[str, Any], Path]) -> None:
    stdout, _, out = run
    for setting in SETTINGS:
        section = stdout.split(f"### {setting}:")[1].split("\n### ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
        assert len(rows) == 2 + len(METHODS) + len(METHODS) - 1  # two headers, methods, rules − DPO
    assert "earlier discrete setting" in stdout
    assert (out / "dpo-imbalance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
