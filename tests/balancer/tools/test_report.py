"""``balancer report``: a PNG with one column per task and every run on the same axes, from a small log written here."""

from __future__ import annotations

import struct

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.recipes.split_half import pool_halves, split_half_sq_norms
from balancer.tools.cli import main
from balancer.tools.metrics import MetricsLogger, read_metrics
from balancer.tools.report import draw_report, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_log(path, runs=("baseline", "task_norm"), steps=12, reward=True, split_half=True):
    torch.manual_seed(0)
    halves = {"tasks": pool_halves, "task_series": {"sq_norms_split_half": split_half_sq_norms}} if split_half else {}
    for run in runs:
        model = torch.nn.Linear(3, 2)
        plugins = [] if run == "baseline" else [run]
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=plugins)
        with MetricsLogger(path, run=run, **halves) as log:
            for step in range(steps):
                x = torch.randn(8, 3)
                opt.backward({"a/A": model(x[:4]).sum(), "a/B": model(x[4:]).sum(), "b": 5 * model(x).square().mean()})
                opt.step()
                opt.zero_grad()
                extra = {"reward": {"a": step / steps, "b": 0.5}} if reward else {}
                log.log(opt, step=step, extra=extra)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_draws_runs_on_the_same_axes(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log)

    out = write_report(log, tmp_path / "figs" / "report.png")

    assert out == tmp_path / "figs" / "report.png"
    width, height = _png_size(out)
    assert out.stat().st_size > 20_000  # curves, labels and legends, not an empty canvas
    _write_log(tmp_path / "one.jsonl", runs=("baseline",), reward=False)
    one_width, one_height = _png_size(write_report(tmp_path / "one.jsonl", tmp_path / "one.png"))
    assert width == one_width  # a column per task (the same two tasks), not per run
    assert one_height < height  # no reward row without rewards


def _panels(fig):
    """The figure's axes by their place: the task panels by (row, task), and the imbalance row."""
    ratio, *tasks = fig.axes
    return tasks, ratio


def test_each_panel_has_one_curve_per_run_and_the_legend_names_what_is_drawn(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log)

    fig = draw_report(read_metrics(log), smooth=2)

    panels, ratio = _panels(fig)
    assert len(panels) == 3 * 2  # norms, weights, rewards x tasks a, b
    assert [ax.get_title() for ax in panels[:2]] == ["a", "b"]
    runs = ("C0", "C1")  # baseline, task_norm
    norms = panels[0].get_lines()  # split-half and naive per run
    assert sorted(line.get_color() for line in norms) == sorted(2 * runs)
    for ax in panels[2:]:  # weights and rewards: one curve per run
        assert [line.get_color() for line in ax.get_lines()] == list(runs)
    [legend] = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["baseline (12 steps)", "task_norm (12 steps)", "‖g‖²: split-half", "‖g‖²: naive"]


def test_no_split_half_label_without_split_half_data(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log, split_half=False)

    fig = draw_report(read_metrics(log))

    panels, ratio = _panels(fig)
    assert all(len(ax.get_lines()) == 2 for ax in [*panels, ratio])  # naive norms only: one curve per run
    [legend] = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == ["baseline (12 steps)", "task_norm (12 steps)"]


def test_a_run_appended_under_the_same_name_is_drawn_as_its_own_curve(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log, runs=("task_norm", "task_norm"), reward=False)

    fig = draw_report(read_metrics(log))

    [legend] = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels[:2] == ["task_norm #1 (12 steps)", "task_norm #2 (12 steps)"]  # 12 steps each, not 24
    panels, _ = _panels(fig)
    for line in panels[-1].get_lines():
        assert list(line.get_xdata()) == list(range(12))  # steps increase along each curve: no zig-zag


def test_report_of_stats_logged_without_weights_or_halves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    with MetricsLogger(log) as logger:
        for step in range(6):
            logger.log(GroupStats.from_gram(torch.diag(torch.tensor([1.0, 4.0 + step])), ["x", "y"]), step=step)

    out = write_report(log, tmp_path / "r.png")

    # two task columns; two task rows and the imbalance row: 6.8 x 7.3 inches at 120 dpi
    assert _png_size(out) == (816, 876)
    assert out.stat().st_size > 10_000


def test_cli_report_writes_the_png_and_says_where(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    _write_log(log, steps=5)

    assert main(["report", str(log), "-o", str(tmp_path / "r.png"), "--smooth", "2"]) == 0

    assert capsys.readouterr().out == f"Report: {tmp_path / 'r.png'}\n"
    _png_size(tmp_path / "r.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("", "no metrics records"),
        ("{oops\n", "metrics.jsonl:1: invalid JSON"),
        ('{"run": "a", "step": 0}\n', "metrics.jsonl: no records with tasks to draw"),
    ],
)
def test_cli_report_errors_are_one_line_messages(tmp_path, capsys, content, message):
    log = tmp_path / "metrics.jsonl"
    if content is not None:
        log.write_text(content)

    assert main(["report", str(log), "-o", str(tmp_path / "r.png")]) == 2

    err = capsys.readouterr().err
    assert err.startswith("balancer report: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "r.png").exists()
