"""MetricsLogger: one strict-JSON line per step, from any training loop; read_metrics groups by run (and run id)."""

from __future__ import annotations

import json

import pytest
import torch

from balancer import Balancer
from balancer.recipes.split_half import pool_halves, split_half_sq_norms
from balancer.tools.metrics import MetricsLogger, read_metrics


def _step(opt: Balancer, model: torch.nn.Module, scale: float) -> None:
    x = torch.randn(4, 3)
    opt.backward({"a/A": model(x[:2]).sum(), "a/B": model(x[2:]).sum()})
    with opt.group("b"):  # captured without Balancer.backward: its loss is not seen (nan -> null)
        (scale * model(x).square().sum()).backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def opt_and_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return Balancer(torch.optim.SGD(model.parameters(), lr=0.01), plugins=["task_norm"]), model


def test_a_line_holds_group_and_task_statistics(tmp_path, opt_and_model):
    opt, model = opt_and_model
    _step(opt, model, scale=10.0)
    path = tmp_path / "logs" / "metrics.jsonl"

    with MetricsLogger(
        path, run="tn", tasks=pool_halves, task_series={"sq_norms_split_half": split_half_sq_norms}
    ) as log:
        returned = log.log(opt, step=7, extra={"reward": {"a": 0.5, "b": torch.tensor(0.25)}, "lr": 0.01})

    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert record == returned
    stats = opt.last_stats
    tasks = pool_halves(stats)
    assert record["run"] == "tn" and record["run_id"] == 1 and record["step"] == 7
    assert record["groups"] == ["a/A", "a/B", "b"] and record["tasks"] == ["a", "b"]
    assert record["norms"] == pytest.approx(stats.norms.tolist(), rel=1e-12)
    assert record["weights"] == stats.weights.tolist()
    torch.testing.assert_close(torch.tensor(record["cosines"], dtype=torch.float64), stats.cosines)
    assert record["losses"][2] is None  # not seen by the Balancer: written as null, not NaN
    assert record["task_sq_norms"] == pytest.approx(tasks.sq_norms.tolist(), rel=1e-12)
    assert record["task_sq_norms_split_half"][0] == pytest.approx(float(split_half_sq_norms(stats)[0]), rel=1e-12)
    assert record["task_sq_norms_split_half"][1] is None  # task b was not split
    # plain task_norm weighs the halves apart; a task's weight is their mean
    assert record["task_weights"] == pytest.approx([stats.weights[:2].mean().item(), stats.weights[2].item()])
    sq = record["task_sq_norms"]
    assert record["imbalance_ratio"] == pytest.approx(max(sq) / min(sq))
    assert record["extra"] == {"reward": {"a": 0.5, "b": 0.25}, "lr": 0.01}


def test_runs_share_a_file_and_read_back_in_order(tmp_path, opt_and_model):
    opt, model = opt_and_model
    path = tmp_path / "metrics.jsonl"
    path.write_text("stale\n")
    for run in ("baseline", "balanced"):
        with MetricsLogger(path, run=run, append=run != "baseline") as log:
            for step in range(3):
                _step(opt, model, scale=1.0)
                log.log(opt.last_stats, step=step)

    runs = read_metrics(path)

    assert list(runs) == ["baseline", "balanced"]
    assert [[r["step"] for r in records] for records in runs.values()] == [[0, 1, 2], [0, 1, 2]]


def test_without_a_task_pooling_every_group_is_a_task(tmp_path, opt_and_model):
    opt, model = opt_and_model
    _step(opt, model, scale=10.0)

    with MetricsLogger(tmp_path / "m.jsonl") as log:
        record = log.log(opt, step=0)

    stats = opt.last_stats
    assert record["tasks"] == record["groups"] == ["a/A", "a/B", "b"]  # the metrics log knows no naming scheme
    assert record["task_sq_norms"] == pytest.approx(stats.sq_norms.tolist(), rel=1e-12)
    assert record["task_weights"] == record["weights"]
    assert not any(key.startswith("task_sq_norms_") for key in record)
    assert record["imbalance_ratio"] == pytest.approx(max(record["task_sq_norms"]) / min(record["task_sq_norms"]))


def test_task_series_cannot_replace_the_records_own_fields(tmp_path):
    with pytest.raises(ValueError, match=r"\['weights'\] would replace"):
        MetricsLogger(tmp_path / "m.jsonl", task_series={"weights": split_half_sq_norms})


def test_a_run_appended_to_a_log_is_a_run_of_its_own(tmp_path, opt_and_model):
    """Appending a second run under the same name used to mix both runs' steps into one zig-zag curve."""
    opt, model = opt_and_model
    path = tmp_path / "metrics.jsonl"
    for _ in range(2):
        with MetricsLogger(path, run="tn") as log:
            for step in range(3):
                _step(opt, model, scale=1.0)
                log.log(opt, step=step)
    with MetricsLogger(path, run="other") as log:
        log.log(opt, step=0)

    runs = read_metrics(path)

    assert list(runs) == ["tn #1", "tn #2", "other"]
    assert [[r["step"] for r in records] for records in runs.values()] == [[0, 1, 2], [0, 1, 2], [0]]
    assert [records[0]["run_id"] for records in runs.values()] == [1, 2, 3]
    with MetricsLogger(path, append=False) as fresh:
        assert fresh.run_id == 1  # a fresh file starts again


def test_lines_without_a_run_id_start_a_run_where_the_step_restarts(tmp_path):
    path = tmp_path / "m.jsonl"
    steps = [0, 1, 2, 0, 1]
    path.write_text("".join(json.dumps({"run": "old", "step": s}) + "\n" for s in steps))

    runs = read_metrics(path)

    assert {name: [r["step"] for r in records] for name, records in runs.items()} == {
        "old #1": [0, 1, 2],
        "old #2": [0, 1],
    }
    with MetricsLogger(path, run="new") as log:
        assert log.run_id == 1  # the old lines have no run id to follow


def test_logging_needs_a_grouped_step_and_an_open_logger(tmp_path):
    opt = Balancer(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    log = MetricsLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="last_stats is None"):
        log.log(opt, step=0)
    log.close()
    with pytest.raises(ValueError, match="is closed"):
        log.log(opt, step=0)


def test_a_zero_gradient_leaves_the_imbalance_ratio_null(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(2, 3)
    opt.backward({"a": model(x).sum(), "b": 0.0 * model(x).sum()})
    opt.step()

    with MetricsLogger(tmp_path / "m.jsonl") as log:
        record = log.log(opt, step=0)

    assert record["task_sq_norms"][1] == 0.0
    assert record["imbalance_ratio"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"run": "a", "step": 0}\n{"run": "a"\n', r"m\.jsonl:2: invalid JSON"),
        ("[1, 2]\n", r"m\.jsonl:1: not a metrics"),
    ],
)
def test_read_metrics_names_the_bad_line(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_metrics(path)


def test_plugin_metrics_are_logged(tmp_path):
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = Balancer(torch.optim.SGD([theta], lr=0.1), plugins=[("balanced_dpo", {"rule": "norm"}), "task_norm"])
    x = torch.randn(4, 3, dtype=torch.float64)
    opt.backward({"chosen": -(x @ theta).mean(), "rejected": 3.0 * (x @ theta).square().mean()})
    opt.step()
    with MetricsLogger(tmp_path / "m.jsonl") as log:
        record = log.log(opt, step=0)
    dpo = record["plugins"]["balanced_dpo"]
    assert "task_norm" not in record["plugins"]  # no metrics of its own: left out
    norms = opt.last_stats.norms.tolist()
    assert dpo["chosen_norm"] == pytest.approx(norms[0]) and dpo["rejected_norm"] == pytest.approx(norms[1])
    assert dpo["logp_chosen"] is None  # nothing was tapped: nan is written as null
    assert read_metrics(tmp_path / "m.jsonl")["run"][0]["plugins"] == record["plugins"]


def test_the_update_norm_and_clip_coefficient_are_logged(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    clipped = Balancer(torch.optim.SGD(model.parameters(), lr=0.01), plugins=["task_norm"], max_grad_norm=0.1)
    _step(clipped, model, scale=10.0)
    plain = Balancer(torch.optim.SGD(model.parameters(), lr=0.01), plugins=["task_norm"])
    _step(plain, model, scale=10.0)
    with MetricsLogger(tmp_path / "m.jsonl") as log:
        record = log.log(clipped, step=0)
        unclipped = log.log(plain, step=0)
    assert record["grad_norm"] == pytest.approx(clipped.last_stats.grad_norm.item(), rel=1e-12)
    assert record["clip_coef"] == pytest.approx(0.1 / (record["grad_norm"] + 1e-6), rel=1e-12)
    assert record["clip_coef"] < 1
    assert unclipped["grad_norm"] is None and unclipped["clip_coef"] is None
