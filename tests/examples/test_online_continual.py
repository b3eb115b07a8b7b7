"""examples/online_continual.py (GSA's recipe): the batches it builds, and a --quick digits run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from continual_stream import streams  # noqa: E402
from continual_stream.methods import train_step  # noqa: E402
from continual_stream.streams import augment, two_views  # noqa: E402

from balancer.recipes.continual import ReservoirBuffer  # noqa: E402

METHODS = ["er", "gsa_w1", "gsa"]


class Recorder:
    """Stands in for the Balancer: records the labels of every tapped batch."""

    def __init__(self):
        self.tapped = []

    def tap(self, logits, group, labels):
        assert len(group) == logits.shape[0] == labels.shape[0]
        self.tapped.append((logits, labels))
        return logits

    def step(self):
        pass

    def zero_grad(self):
        pass


def _memory_with_tasks(tasks, per_task=40):
    memory = ReservoirBuffer(1000, generator=torch.Generator().manual_seed(0))
    for t in range(tasks):
        memory.add(torch.randn(per_task, 4), 2 * t + torch.arange(per_task) % 2, t)
    return memory


@pytest.mark.parametrize("task", [1, 2, 4])
def test_gsa_balanced_batch_has_the_current_task_share_of_the_head_in_two_views(task):
    memory, opt = _memory_with_tasks(task + 1), Recorder()
    head = torch.arange(10) < 2 * (task + 1)
    model = torch.nn.Linear(4, 10)
    x, y = torch.randn(10, 4), 2 * task + torch.arange(10) % 2
    gen = torch.Generator().manual_seed(1)
    train_step("gsa", model, opt, memory, x, y, task, head, 0, gen)
    ((logits, labels),) = opt.tapped
    rate = 2 / (2 * (task + 1))  # GSA's ρ: current-task classes / head classes
    old, cur = int(64 * (1 - rate)), int(64 * rate)
    assert labels.shape == (2 * (old + cur),)  # two views of every row
    torch.testing.assert_close(labels[: old + cur], labels[old + cur :])
    assert int((labels < 2 * task).sum()) == 2 * old and int((labels >= 2 * task).sum()) == 2 * cur
    assert torch.isinf(logits[:, 2 * (task + 1) :]).all() and torch.isfinite(logits[:, : 2 * (task + 1)]).all()
    assert len(memory) == memory.seen == 40 * (task + 1) + 10  # the stream batch entered afterwards


def test_er_replays_64_rows_with_the_stream_batch_in_two_views():
    memory, opt = _memory_with_tasks(3), Recorder()
    x, y = torch.randn(10, 4), 4 + torch.arange(10) % 2
    train_step("er", torch.nn.Linear(4, 10), opt, memory, x, y, 2, torch.arange(10) < 6, 0, torch.Generator())
    ((_, labels),) = opt.tapped
    assert labels.shape == (2 * (10 + 64),)
    torch.testing.assert_close(labels[:10], y)


def test_views_shift_circularly_scale_and_add_noise():
    x = torch.zeros(500, 40)
    x[:, 20] = 1.0  # a spike: its position after the view is the shift
    views, labels = two_views(x, torch.arange(500), 3, torch.Generator().manual_seed(0))
    assert views.shape == (1000, 40) and torch.equal(labels, torch.arange(500).repeat(2))
    peak = views.argmax(1)
    assert set((peak - 20).tolist()) == set(range(-3, 4))  # every shift in [-3, 3], each about equally often
    height = views.max(1).values
    assert 0.9 - 0.25 < height.min() and height.max() < 1.1 + 0.25  # scale in [0.9, 1.1], noise sd 0.05 (5 sd)
    flat = augment(torch.zeros(20_000, 1), 0, torch.Generator().manual_seed(1))
    assert abs(flat.std().item() - 0.05) < 0.002  # shift 0 (digits): noise only


def test_quick_run_writes_results_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "examples/online_continual.py", "--quick", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"] == {"dataset": "digits", "seeds": 2, "memories": [100], "methods": METHODS}
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in (0, 1))
    for r in runs:
        assert 0.0 <= r["old_accuracy"] <= 1.0 and 0.0 <= r["new_accuracy"] <= 1.0
        assert r["final_accuracy"] == pytest.approx((4 * r["old_accuracy"] + r["new_accuracy"]) / 5)
        assert 2 / (1 + 2.718281828) <= r["weight_old"] <= 2.0 and 0.54 <= r["weight_new"] <= 2.0
        assert all(len(row) == 12 for row in r["ant_trace"])  # task, step, 10 classes
    summary = result["summary"]["100"]
    by = {(r["method"], r["seed"]): r for r in runs}
    for a, b in (("gsa", "er"), ("gsa_w1", "er"), ("gsa", "gsa_w1")):
        mean, _, n = summary["paired"][f"{a} - {b}: final_accuracy"]
        assert n == 2
        assert mean == pytest.approx(sum(by[a, s]["final_accuracy"] - by[b, s]["final_accuracy"] for s in (0, 1)) / 2)
    # a rerun finds every run in runs.jsonl and trains nothing
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "seed 0" not in again.stdout and "6 runs" in again.stdout


def test_mnist1d_stream_is_generated_offline_with_the_requested_size():
    """The main setting's data: mnist1d's own generator (no download), 80/20 split, 10 balanced classes,
    40 features; a linear model is far from solving it (the regime the experiment needs)."""
    pytest.importorskip("mnist1d")
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    arrays = streams.mnist1d_arrays(2000)
    assert arrays["x"].shape == (1600, 40) and arrays["x_test"].shape == (400, 40)
    counts = np.bincount(arrays["y"], minlength=10)
    assert counts.min() >= 120 and counts.max() <= 200  # about balanced over the 10 digits
    linear = LogisticRegression(max_iter=500).fit(arrays["x"], arrays["y"])
    assert linear.score(arrays["x_test"], arrays["y_test"]) < 0.5  # MNIST-1D's point: not linearly separable
