"""``balancer demo --quick``: both runs logged step by step, a report, the same log for the same seed."""

from __future__ import annotations

import contextlib
import io
import math

import pytest

from balancer.demo.summary import spearman, summarize
from balancer.demo.tasks import LENGTH_TASKS, NATURE_TASKS
from balancer.recipes.split_half import half_groups
from balancer.tools.cli import main
from balancer.tools.metrics import read_metrics

QUICK_STEPS = 24
TASK_NAMES = [t.name for t in NATURE_TASKS]


def _demo(*args: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", *args])
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, text = _demo("--quick", "--seed", "3", "--out", str(out))
    assert code == 0
    return out, text


def test_quick_demo_logs_both_runs_at_every_step(quick_demo):
    out, text = quick_demo
    log, png = out / "metrics.jsonl", out / "report.png"

    assert f"Metrics log: {log}\n" in text and f"Report:      {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = read_metrics(log)
    assert list(runs) == ["baseline", "task_norm"]
    groups = [g for t in TASK_NAMES for g in half_groups(t)]
    for name, records in runs.items():
        assert [r["step"] for r in records] == list(range(QUICK_STEPS))
        for r in records:
            assert r["groups"] == groups and r["tasks"] == TASK_NAMES
            assert all(math.isfinite(v) for v in r["norms"] + r["task_sq_norms"] + r["task_sq_norms_split_half"])
            assert set(r["extra"]["reward"]) == set(TASK_NAMES)
            weights = r["weights"]
            assert weights[0::2] == weights[1::2]  # both halves of a task get the task's weight
            if name == "baseline":
                assert weights == [1.0] * len(groups)
            assert all(math.isfinite(v) for v in r["extra"]["sq_norm_last"].values())
            assert r["extra"]["prompts"] == dict.fromkeys(TASK_NAMES, 4.0)  # uniform sampling, --quick
    assert any(w != 1.0 for r in runs["task_norm"] for w in r["weights"])


def test_the_summary_tables_are_printed(quick_demo):
    _, text = quick_demo

    for run in ("baseline", "task_norm"):
        assert f"== {run} ({QUICK_STEPS} steps) ==" in text
    assert "imbalance ratio max/min |g|^2:" in text
    assert "worst task of baseline:" in text
    for task in TASK_NAMES:
        assert any(line.startswith(f"{task} ") for line in text.splitlines())


def test_same_seed_same_log_and_another_seed_another(quick_demo, tmp_path):
    out, _ = quick_demo
    assert _demo("--quick", "--seed", "3", "--out", str(tmp_path / "same"))[0] == 0
    assert _demo("--quick", "--seed", "4", "--steps", "2", "--out", str(tmp_path / "other"))[0] == 0

    first = (out / "metrics.jsonl").read_text().splitlines()
    assert (tmp_path / "same" / "metrics.jsonl").read_text().splitlines() == first
    other = (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()
    assert other[:2] != first[:2]


@pytest.mark.parametrize(
    ("plugins", "message"),
    [("", "the balanced run needs at least one plugin"), ("task_norm,nope", "Unknown plugin `nope`")],
)
def test_bad_plugin_lists_fail_before_training(tmp_path, capsys, plugins, message):
    assert main(["demo", "--quick", "--plugins", plugins, "--out", str(tmp_path)]) == 2

    captured = capsys.readouterr()
    assert captured.err.startswith("balancer demo: error: ") and message in captured.err
    assert captured.out == ""
    assert not (tmp_path / "metrics.jsonl").exists()


def test_summary_learning_gains_follow_the_reward_windows(quick_demo):
    out, _ = quick_demo
    records = read_metrics(out / "metrics.jsonl")["baseline"]
    summary = summarize(records)

    task = summary.tasks[0]
    rewards = [r["extra"]["reward"][task.name] for r in records]
    first, second = sum(rewards[:5]) / 5, sum(rewards[5:10]) / 5  # 24 steps in 5 windows: 0, 5, 10, 14, 19, 24
    assert task.reward_first == pytest.approx(first)
    assert task.gain_early == pytest.approx(second - first)
    assert task.reward_final == pytest.approx(sum(rewards[-2:]) / 2)  # the last 10% of steps, rounded


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 1]) is None
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)


def test_progress_goes_to_stderr_as_lines_when_it_is_not_a_terminal(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "2", "--out", str(tmp_path)]) == 0

    err = capsys.readouterr().err
    assert "\r" not in err  # no progress bar
    lines = err.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "baseline: step 1/2",
        "baseline: step 2/2",
        "task_norm: step 1/2",
        "task_norm: step 2/2",
    ]


def test_the_length_setting_trains_the_length_tasks_with_the_per_sequence_loss(tmp_path):
    code, text = _demo("--quick", "--steps", "2", "--setting", "length", "--out", str(tmp_path))

    assert code == 0
    assert "count (8-token answer), mul1 (1-token answer), max (1-token answer) (setting 'length')" in text
    assert "loss normalised per sequence" in text
    assert read_metrics(tmp_path / "metrics.jsonl")["baseline"][0]["tasks"] == [t.name for t in LENGTH_TASKS]
