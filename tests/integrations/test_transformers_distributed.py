"""BalancedTrainer and BalancedSFTTrainer under DDP: 2 CPU ranks (gloo) whose micro-batches hold
different groups, with gradient accumulation.

Every rank must run the groups present on any rank (the Balancer checks that ranks captured the
same groups), and the micro-batch that synchronises also every group an earlier micro-batch of
the step captured (DDP reduces a group only in a synchronised backward); a rank without rows of a
group runs it with a zero loss. With no plugin the runs equal ``Trainer``'s and ``SFTTrainer``'s,
and both ranks end with the same parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("trl")

SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
import transformers
sys.path.insert(0, sys.argv[2])  # the repository, for the tests' fixtures
from transformers import Trainer, TrainingArguments
from balancer.integrations._hf_groups import GROUP_KEY
from balancer.integrations.transformers import BalancedTrainer
from tests.integrations.test_transformers import dataset, tiny_llama
from tests.integrations.trl_fixtures import common_args

transformers.logging.set_verbosity_error()
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
present = []

class Recording(BalancedTrainer):
    def group_losses(self, model, inputs, num_items_in_batch=None):
        present.append(sorted(set(inputs[GROUP_KEY])))
        return super().group_losses(model, inputs, num_items_in_batch)

def run(name, cls, extra):
    args = TrainingArguments(**common_args(out / name, per_device_train_batch_size=1, optim="sgd", learning_rate=0.5,
                                           max_steps=4, ddp_backend="gloo"))
    t = cls(model=tiny_llama(), args=args, train_dataset=dataset(), **extra)
    t.train()
    model = t.accelerator.unwrap_model(t.model)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}-{rank}.pt")

run("plain", Trainer, {})
run("none", Recording, {"balancer": [], "group_by": "task"})
run("task_norm", Recording, {"balancer": ["task_norm"], "group_by": "task"})
(out / f"present-{rank}.json").write_text(json.dumps(present))

from trl import SFTTrainer
from balancer.integrations._trl_sft import BalancedSFTTrainer
from tests.integrations.test_trl_sft import config, text_data, tokenizer

def run_sft(name, cls, extra):
    args = config(out / name, per_device_train_batch_size=1, learning_rate=0.5, ddp_backend="gloo")
    t = cls(model=tiny_llama(), args=args, train_dataset=text_data(), processing_class=tokenizer(), **extra)
    t.train()
    model = t.accelerator.unwrap_model(t.model)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}-{rank}.pt")

run_sft("sft_plain", SFTTrainer, {})
run_sft("sft_none", BalancedSFTTrainer, {"balancer": [], "group_by": "task"})
dist.barrier()
os._exit(0)  # gloo's teardown at exit can abort after the results are written
"""


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


def test_ranks_with_different_groups_run_the_union_and_equal_the_trainers(launch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    launch(SCRIPT, str(Path(__file__).resolve().parents[2]), timeout=300)
    load = lambda name, rank: torch.load(tmp_path / f"{name}-{rank}.pt", weights_only=True)  # noqa: E731
    present = [json.loads((tmp_path / f"present-{rank}.json").read_text()) for rank in (0, 1)]
    assert any(a != b for a, b in zip(*present, strict=True))  # the case under test happened
    assert _relative(load("plain", 0), load("none", 0)) <= 1e-6
    for name in ("plain", "none", "task_norm"):
        assert _relative(load(name, 0), load(name, 1)) == 0.0, name
    assert _relative(load("none", 0), load("task_norm", 0)) > 1e-4  # task_norm acted
    assert _relative(load("sft_plain", 0), load("sft_none", 0)) <= 1e-6
    assert _relative(load("sft_none", 0), load("sft_none", 1)) == 0.0
