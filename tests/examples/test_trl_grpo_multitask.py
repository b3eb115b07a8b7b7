"""examples/trl_grpo_multitask.py runs two steps of each run through BalancedGRPOTrainer(task_stats=True): every
task is measured in every step (norm, split-half estimate, reward, learning gain), the numbers agree with each other
and with the group norms, the plain run keeps weight 1 and task_norm equalises the tasks' norms (numbers, not just a
run)."""

from __future__ import annotations

import importlib.util
import io
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo_multitask.py"
STEPS = 2
TASKS = ("letters", "digits", "equals")
DENSE = ("letters", "digits")  # rewards that differ between completions from the start: a non-zero gradient

Logs = dict[str, list[dict[str, float]]]


@pytest.fixture(scope="module")
def run() -> tuple[Logs, str]:
    spec = importlib.util.spec_from_file_location("example_trl_grpo_multitask", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed = io.StringIO()
    with redirect_stdout(printed):
        logs = module.main(["--steps", str(STEPS)])
    return logs, printed.getvalue()


def test_every_task_is_measured_in_every_step(run: tuple[Logs, str]) -> None:
    logs, _ = run
    assert set(logs) == {"plain", "task_norm"}
    for entries in logs.values():
        assert len(entries) == STEPS
        for entry in entries:
            for task in TASKS:
                sq, split = entry[f"balancer/sq_norm/{task}"], entry[f"balancer/split_half_sq_norm/{task}"]
                assert math.isfinite(sq) and sq >= 0 and math.isfinite(split)
                assert entry[f"balancer/completions/{task}"] == 8  # stratified: 2 prompts x 4 generations
                # equal halves of one prompt each: ‖g_A + g_B‖² = ‖g_A‖² + ‖g_B‖² + 2⟨g_A, g_B⟩, split = 4⟨g_A, g_B⟩
                halves = entry[f"balancer/norm/{task}/A"] ** 2 + entry[f"balancer/norm/{task}/B"] ** 2
                assert sq == pytest.approx(halves + split / 2, rel=1e-4, abs=1e-9)
            assert all(entry[f"balancer/sq_norm/{task}"] > 0 for task in DENSE)
            sq_norms = [entry[f"balancer/sq_norm/{task}"] for task in TASKS]
            if min(sq_norms) > 0:
                assert entry["balancer/sq_norm_ratio"] == pytest.approx(max(sq_norms) / min(sq_norms), rel=1e-6)
            else:  # a task without gradient (equals: every reward 0) makes the ratio undefined: not logged
                assert "balancer/sq_norm_ratio" not in entry


def test_measurement_of_the_first_step_does_not_depend_on_the_plugin(run: tuple[Logs, str]) -> None:
    logs, _ = run
    plain, balanced = logs["plain"][0], logs["task_norm"][0]  # same data, seed and parameters
    for task in TASKS:
        for key in (f"balancer/sq_norm/{task}", f"balancer/split_half_sq_norm/{task}", f"balancer/reward/{task}"):
            assert balanced[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-12)


def test_plain_keeps_weight_one_and_task_norm_equalises_the_tasks(run: tuple[Logs, str]) -> None:
    logs, _ = run
    for entry in logs["plain"]:
        assert all(entry[f"balancer/weight/{task}/{half}"] == 1.0 for task in TASKS for half in "AB")
    for entry in logs["task_norm"]:
        for task in TASKS:  # SplitHalf: both halves of a task get the task's weight
            assert entry[f"balancer/weight/{task}/A"] == entry[f"balancer/weight/{task}/B"]
        weighted = [entry[f"balancer/weight/{t}/A"] * entry[f"balancer/sq_norm/{t}"] ** 0.5 for t in DENSE]
        assert weighted == pytest.approx([weighted[0]] * len(DENSE), rel=1e-4)
        assert any(entry[f"balancer/weight/{t}/A"] != pytest.approx(1.0, abs=1e-3) for t in DENSE)


def test_learning_gain_is_the_change_in_reward(run: tuple[Logs, str]) -> None:
    logs, _ = run
    for entries in logs.values():
        first, second = entries
        assert not any(key.startswith("balancer/learning_gain/") for key in first)  # no earlier generation yet
        for task in TASKS:
            gain = second[f"balancer/learning_gain/{task}"]
            reward = second[f"balancer/reward/{task}"] - first[f"balancer/reward/{task}"]
            assert gain == pytest.approx(reward, abs=1e-6)


def test_tables_print_every_task_with_finite_numbers(run: tuple[Logs, str]) -> None:
    _, printed = run
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] and line.split()[0] in TASKS]
    assert [row[0] for row in rows] == list(TASKS) * 2  # plain, then task_norm
    assert all(math.isfinite(float(row[1])) and math.isfinite(float(row[2])) for row in rows)
    assert "wall time: plain" in printed
