"""examples/trainer_multitask.py runs with --quick: both runs train through BalancedTrainer, print a
per-task eval loss, and write a metrics log that holds every task's gradient norm and weight at
every step (numbers, not just a file) and that ``balancer report`` can draw."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
# transformers' own deprecation notices, not this project's: the fixture runs under whichever test comes first
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
]

from balancer.tools.metrics import read_metrics  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "trainer_multitask.py"
TASKS = {"copy", "sort", "mul"}
QUICK_STEPS = 4


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_trainer_multitask", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, float]], Path]:
    out = tmp_path_factory.mktemp("trainer_multitask")
    return load_script().main(["--quick", "--out", str(out)]), out


def test_both_runs_report_a_finite_eval_loss_per_task(run: tuple[dict[str, dict[str, float]], Path]) -> None:
    losses, _ = run
    assert set(losses) == {"baseline", "task_norm"}
    for per_task in losses.values():
        assert set(per_task) == TASKS
        assert all(math.isfinite(v) and v > 0 for v in per_task.values())


def test_metrics_log_holds_norms_and_weights_of_every_step(run: tuple[dict[str, dict[str, float]], Path]) -> None:
    _, out = run
    runs = read_metrics(out / "metrics.jsonl")
    assert set(runs) == {"baseline", "task_norm"}
    for name, records in runs.items():
        assert [r["step"] for r in records] == list(range(1, QUICK_STEPS + 1))
        for record in records:
            assert set(record["tasks"]) == TASKS  # stratify=True: every task in every step
            norms = dict(zip(record["groups"], record["norms"], strict=True))
            weights = dict(zip(record["tasks"], record["task_weights"], strict=True))
            assert all(math.isfinite(v) and v > 0 for v in norms.values())
            if name == "baseline":
                assert set(weights.values()) == {1.0}
            else:  # task_norm: w_k |g_k| is the same for every task
                scaled = [weights[t] * norms[t] for t in TASKS]
                assert max(scaled) == pytest.approx(min(scaled), rel=1e-4)
                assert set(weights.values()) != {1.0}


def test_balancer_report_draws_the_log(run: tuple[dict[str, dict[str, float]], Path]) -> None:
    pytest.importorskip("matplotlib")
    from balancer.tools.report import write_report

    _, out = run
    png = write_report(out / "metrics.jsonl", out / "report.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
