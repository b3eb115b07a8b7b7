"""``balancer report``: a PNG with one column per run, from a small log written here."""

from __future__ import annotations

import struct

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.tools.cli import main
from balancer.tools.metrics import MetricsLogger
from balancer.tools.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_log(path, runs=("baseline", "task_norm"), steps=12, reward=True):
    torch.manual_seed(0)
    for run in runs:
        model = torch.nn.Linear(3, 2)
        plugins = [] if run == "baseline" else [run]
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=plugins)
        with MetricsLogger(path, run=run) as log:
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


def test_report_draws_runs_side_by_side(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log)

    out = write_report(log, tmp_path / "figs" / "report.png")

    assert out == tmp_path / "figs" / "report.png"
    width, height = _png_size(out)
    assert out.stat().st_size > 20_000  # curves, labels and legends, not an empty canvas
    _write_log(tmp_path / "one.jsonl", runs=("baseline",), reward=False)
    one_width, one_height = _png_size(write_report(tmp_path / "one.jsonl", tmp_path / "one.png"))
    assert width == 2 * one_width  # a column per run
    assert one_height < height  # no reward row without rewards


def test_report_of_stats_logged_without_weights_or_halves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    with MetricsLogger(log) as logger:
        for step in range(6):
            logger.log(GroupStats.from_gram(torch.diag(torch.tensor([1.0, 4.0 + step])), ["x", "y"]), step=step)

    out = write_report(log, tmp_path / "r.png")

    assert _png_size(out) == (416, 576)  # one run, three rows (no rewards): 5.2 x 7.2 inches at 80 dpi
    assert out.stat().st_size > 10_000


def test_cli_report_writes_the_png_and_says_where(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    _write_log(log, steps=5)

    assert main(["report", str(log), "-o", str(tmp_path / "r.png"), "--smooth", "2"]) == 0

    assert capsys.readouterr().out == f"Report: {tmp_path / 'r.png'}\n"
    _png_size(tmp_path / "r.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("", "no metrics records"), ("{oops\n", "metrics.jsonl:1: invalid JSON")],
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
