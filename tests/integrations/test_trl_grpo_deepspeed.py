"""``BalancedGRPOTrainer`` with ``GRPOConfig(deepspeed=...)`` on 2 CPU ranks: ZeRO-2 and ZeRO-3.

Under DeepSpeed each task runs its own forward (the coefficients come from TRL's loss on a forward
without gradient). One torchrun launch trains, per stage, TRL's ``GRPOTrainer`` and
``BalancedGRPOTrainer`` with no plugin (with the KL term and an entropy bonus) and with ``task_norm``,
and tries a model with dropout, which is refused there; the tests read its outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from tests.integrations.trl_fixtures import launch_reports, load_parameters, relative_difference  # noqa: E402

STAGES = (2, 3)

SCRIPT = """
import json, os, sys, warnings
from pathlib import Path
sys.path.insert(0, os.getcwd())
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, datasets, transformers
from trl import GRPOTrainer
from balancer.errors import BalancerError
from balancer.integrations._trl_grpo import BalancedGRPOTrainer
from tests.integrations.test_trl_grpo import make
from tests.integrations.trl_fixtures import deepspeed_config, save_engine_parameters, tiny_llama

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
model_dir = out / f"tiny_llama{rank}"  # the same weights; one copy per rank (no process group yet)
tiny_llama().save_pretrained(model_dir)
dropout = tiny_llama()
dropout.config.attention_dropout = 0.1
dropout.save_pretrained(out / f"dropout{rank}")  # TRL builds the reference model (beta > 0) from a path

def build(cls, stage, trainer=None, model=None, **overrides):
    kw = dict(optim="sgd", per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3,
              max_grad_norm=0.0, use_cpu=True, deepspeed=deepspeed_config(stage), beta=0.1, entropy_coef=0.01)
    kw.update(overrides)
    return make(out / f"run{stage}", cls, model=str(model_dir) if model is None else model, trainer=trainer, **kw)

def finish(trainer, key, report):
    save_engine_parameters(trainer, out / f"{key}-{rank}.pt")
    report[key] = [e for e in trainer.state.log_history if "loss" in e]

report = {}
for stage in (2, 3):
    for key, cls, extra in (
        ("plain", GRPOTrainer, None),
        ("none", BalancedGRPOTrainer, {"balancer": None}),
        ("task_norm", BalancedGRPOTrainer, {"balancer": ["task_norm"]}),
    ):
        trainer = build(cls, stage, extra)
        trainer.train()
        finish(trainer, f"zero{stage}_{key}", report)

try:
    build(BalancedGRPOTrainer, 2, {"balancer": None}, model=str(out / f"dropout{rank}")).train()
except BalancerError as exc:
    report["refused_dropout"] = f"{type(exc).__name__}: {exc}"
(out / f"report{rank}.json").write_text(json.dumps(report))
dist.barrier()
os._exit(0)  # gloo's teardown at exit can abort after the results are written
"""


@pytest.fixture(scope="module")
def runs(launch_once: Any) -> tuple[Path, list[dict]]:
    return launch_reports(launch_once, SCRIPT)


def params(path: Path, key: str, rank: int) -> list[torch.Tensor]:
    return load_parameters(path / f"{key}-{rank}.pt")


@pytest.mark.parametrize("stage", STAGES)
def test_no_plugin_equals_grpo_trainer(runs: tuple[Path, list[dict]], stage: int) -> None:
    """The KL term and the entropy bonus are ungrouped (a third forward); the tasks' passes add up to TRL's
    policy gradient: SGD parameters equal GRPOTrainer's on both ranks."""
    path, reports = runs
    for rank in (0, 1):
        plain, ours = f"zero{stage}_plain", f"zero{stage}_none"
        assert relative_difference(params(path, plain, rank), params(path, ours, rank)) <= 1e-6  # measured 6e-8
        for a, b in zip(reports[rank][plain], reports[rank][ours], strict=True):
            assert b["reward"] == a["reward"]  # the same completions
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-9)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert any(key.startswith("balancer/norm/") for key in reports[rank][ours][-1])


@pytest.mark.parametrize("stage", STAGES)
def test_task_norm_balances_the_tasks_identically_on_both_ranks(runs: tuple[Path, list[dict]], stage: int) -> None:
    path, reports = runs
    key = f"zero{stage}_task_norm"
    assert relative_difference(params(path, key, 0), params(path, key, 1)) == 0.0
    assert relative_difference(params(path, key, 0), params(path, f"zero{stage}_plain", 0)) > 1e-4
    balanced_steps = 0
    for entry0, entry1 in zip(reports[0][key], reports[1][key], strict=True):
        norms = {k.rpartition("/")[2]: v for k, v in entry0.items() if k.startswith("balancer/norm/")}
        assert norms and norms == {task: entry1[f"balancer/norm/{task}"] for task in norms}
        weighted = [entry0[f"balancer/weight/{task}"] * norm for task, norm in norms.items() if norm > 0]
        assert max(weighted) == pytest.approx(min(weighted), rel=1e-4)
        balanced_steps += len(weighted) >= 2
    assert balanced_steps >= 1  # a step with two tasks of nonzero gradient


def test_dropout_refused(runs: tuple[Path, list[dict]]) -> None:
    _, reports = runs
    assert "config.attention_dropout=0.1" in reports[0]["refused_dropout"]
