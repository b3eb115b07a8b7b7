"""BalancedDPOTrainer under DDP: 2 CPU ranks (gloo) through TRL's accelerate setup.

One launch trains, on both ranks, plain ``DPOTrainer``, ``BalancedDPOTrainer`` with no plugin and
with ``balanced_dpo`` (both rules); each rank writes its parameters and logs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from tests.integrations.trl_fixtures import tiny_llama  # noqa: E402

SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
import transformers
sys.path.insert(0, sys.argv[2])  # the repository, for tests.integrations.trl_fixtures
from trl import DPOConfig, DPOTrainer
from balancer.integrations._trl_dpo import BalancedDPOTrainer
from tests.integrations.trl_fixtures import common_args, preference_dataset, tiny_llama, tiny_tokenizer

transformers.logging.set_verbosity_error()
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])

def run(name, cls, extra):
    args = DPOConfig(**common_args(out / name, optim="sgd", learning_rate=0.5, max_grad_norm=0.3, bf16=False,
                                   gradient_checkpointing=False, ddp_backend="gloo"))
    t = cls(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=preference_dataset(32),
            processing_class=tiny_tokenizer(), **extra)
    t.train()
    model = t.accelerator.unwrap_model(t.model)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}-{rank}.pt")
    logs = [e for e in t.state.log_history if "loss" in e]
    (out / f"{name}-{rank}.json").write_text(json.dumps(logs))

run("plain", DPOTrainer, {})
run("none", BalancedDPOTrainer, {"balancer": None})
run("norm", BalancedDPOTrainer, {"balancer": ["balanced_dpo"]})
run("prob", BalancedDPOTrainer, {"balancer": [("balanced_dpo", {"rule": "prob"})]})
dist.barrier()
os._exit(0)  # gloo's teardown at exit can abort after the results are written
"""


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ddp_equals_dpo_trainer_and_ranks_agree(launch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    launch(SCRIPT, str(Path(__file__).resolve().parents[2]), timeout=420)
    load = lambda name, rank: torch.load(tmp_path / f"{name}-{rank}.pt")  # noqa: E731
    plain = load("plain", 0)
    start = tiny_llama().state_dict()
    assert relative(plain, load("none", 0)) <= 1e-6
    for name in ("none", "norm", "prob"):
        assert relative(load(name, 0), load(name, 1)) == 0.0, name  # every rank applies the same update
    assert relative(plain, load("norm", 0)) > 1e-4 and relative(plain, start) > 1e-3
    # norm acts on the groups (captured and logged); prob acts at the taps only (one backward, no groups)
    for name, keys in (
        ("norm", ("balancer/norm/chosen", "balancer/weight/rejected")),
        ("prob", ("balancer/balanced_dpo/prob_factor", "balancer/balanced_dpo/logp_chosen")),
    ):
        logs = [json.loads((tmp_path / f"{name}-{rank}.json").read_text()) for rank in (0, 1)]
        for key in keys:
            assert logs[0][-1][key] == logs[1][-1][key] != 0, (name, key)
    assert "balancer/norm/chosen" not in logs[0][-1]
