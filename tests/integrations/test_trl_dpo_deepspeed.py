"""``BalancedDPOTrainer`` with ``DPOConfig(deepspeed=...)`` on 2 CPU ranks: ZeRO-2 and ZeRO-3.

Under DeepSpeed each side of the pairs runs its own forward (the coefficients come from TRL's loss
on a forward without gradient). One torchrun launch trains, per stage, TRL's ``DPOTrainer`` and
``BalancedDPOTrainer`` with no plugin (with and without the ``"sft"`` term) and with
``balanced_dpo``, and tries the settings that are refused there; the tests read its outputs.
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
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
import datasets, transformers
from trl import DPOConfig, DPOTrainer
from balancer.errors import BalancerError
sys.path.insert(0, os.getcwd())
from balancer.integrations._trl_dpo import BalancedDPOTrainer
from tests.integrations.trl_fixtures import (deepspeed_config, preference_dataset, save_engine_parameters, tiny_llama,
                                             tiny_tokenizer)

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])

def make(cls, stage, extra=None, **overrides):
    kw = dict(output_dir=str(out / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
              optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to=[],
              save_strategy="no", disable_tqdm=True, seed=0, bf16=False, gradient_checkpointing=False,
              use_cpu=True, deepspeed=deepspeed_config(stage), beta=0.1)  # use_cpu: else accelerate sees one process
    kw.update(overrides)
    return cls(model=tiny_llama(), ref_model=tiny_llama(), args=DPOConfig(**kw), train_dataset=preference_dataset(32),
               processing_class=tiny_tokenizer(), **(extra or {}))

def finish(trainer, key, report):
    save_engine_parameters(trainer, out / f"{key}-{rank}.pt")
    report[key] = [e for e in trainer.state.log_history if "loss" in e]

report = {}
for stage in (2, 3):
    for key, cls, extra, kw in (
        ("plain", DPOTrainer, None, {}),
        ("none", BalancedDPOTrainer, {"balancer": None}, {}),
        ("plain_sft", DPOTrainer, None, {"loss_type": ["sigmoid", "sft"]}),
        ("none_sft", BalancedDPOTrainer, {"balancer": None}, {"loss_type": ["sigmoid", "sft"]}),
        ("norm", BalancedDPOTrainer, {"balancer": ["balanced_dpo"]}, {}),
    ):
        trainer = make(cls, stage, extra, **kw)
        trainer.train()
        finish(trainer, f"zero{stage}_{key}", report)

def refused(name, extra, **kwargs):
    try:
        make(BalancedDPOTrainer, 2, extra, **kwargs).train()
    except BalancerError as exc:
        report[name] = f"{type(exc).__name__}: {exc}"

refused("refused_prob", {"balancer": [("balanced_dpo", {"rule": "prob"})]})
refused("refused_dropout", {"balancer": None}, disable_dropout=False)
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
@pytest.mark.parametrize("sft", ["", "_sft"])
def test_no_plugin_equals_dpo_trainer(runs: tuple[Path, list[dict]], stage: int, sft: str) -> None:
    path, reports = runs
    for rank in (0, 1):
        plain, ours = f"zero{stage}_plain{sft}", f"zero{stage}_none{sft}"
        assert relative_difference(params(path, plain, rank), params(path, ours, rank)) <= 1e-5
        for a, b in zip(reports[rank][plain], reports[rank][ours], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_norm_rule_balances_the_sides_identically_on_both_ranks(runs: tuple[Path, list[dict]], stage: int) -> None:
    path, reports = runs
    key = f"zero{stage}_norm"
    assert relative_difference(params(path, key, 0), params(path, key, 1)) == 0.0
    assert relative_difference(params(path, key, 0), params(path, f"zero{stage}_plain", 0)) > 1e-4
    for entry0, entry1 in zip(reports[0][key], reports[1][key], strict=True):
        assert entry0["balancer/norm/chosen"] == entry1["balancer/norm/chosen"] > 0
        chosen = entry0["balancer/weight/chosen"] * entry0["balancer/norm/chosen"]
        rejected = entry0["balancer/weight/rejected"] * entry0["balancer/norm/rejected"]
        assert chosen == pytest.approx(rejected, rel=1e-6)


def test_refusals(runs: tuple[Path, list[dict]]) -> None:
    _, reports = runs
    assert "pair the chosen and rejected rows" in reports[0]["refused_prob"]
    assert "disable_dropout=False" in reports[0]["refused_dropout"]
