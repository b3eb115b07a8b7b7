"""``BalancedTrainer`` with ``TrainingArguments(deepspeed=...)`` on 2 CPU ranks: ZeRO-2 and ZeRO-3.

One torchrun launch trains every variant (plain ``Trainer`` and ``BalancedTrainer``, with and
without DeepSpeed's clipping, ``task_norm``, a resumed run) and tries the refused settings; the
tests read its outputs. The reference for ``task_norm`` is one process with a plain torch Balancer
on the global batch of each step (the rows both ranks saw).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from balancer import Balancer

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

STEPS = 3
LR = 1e-2
CLIP = 0.5
STAGES = (2, 3)
TASKS = {"small": 0.1, "mid": 1.0, "large": 30.0}  # gradient scales differ by 300x

SCRIPT = """
import glob, json, os, sys, torch, torch.distributed as dist
from pathlib import Path
import datasets, deepspeed, transformers
from transformers import Trainer, TrainingArguments
from accelerate.state import AcceleratorState, GradientState
from balancer import Balancer
from balancer.errors import BalancerError
from balancer.integrations.transformers import BalancedTrainer

transformers.logging.set_verbosity_error()
out, TASKS, STEPS = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
LR, CLIP = float(sys.argv[4]), float(sys.argv[5])
rank = int(os.environ["RANK"])

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    def forward(self, x, labels, idx=None):
        pred = self.body(x)
        return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}

def data():
    gen = torch.Generator().manual_seed(1)
    names = [list(TASKS)[i % 3] for i in range(48)]
    x = torch.randn(48, 6, generator=gen)
    y = torch.randn(48, 3, generator=gen) * torch.tensor([TASKS[t] for t in names])[:, None]
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist(), "task": names, "idx": list(range(48))})

class Recording:
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["idx"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)

class PlainT(Recording, Trainer): seen = None
class BalancedT(Recording, BalancedTrainer): seen = None

def make(cls, stage, clip, plugins=None, ds_extra=None, **overrides):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "steps_per_print": 10**9, "zero_optimization": {"stage": stage}}
    if stage == 3:  # without it Trainer's ZeRO-3 save falls back to a path whose ranks race on model.safetensors
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    ds.update(ds_extra or {})
    kw = dict(output_dir=str(out / "run"), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=LR,
              optim="sgd", lr_scheduler_type="constant", max_grad_norm=clip, logging_steps=1, report_to=[],
              save_strategy="no", disable_tqdm=True, seed=0, deepspeed=ds,
              use_cpu=True)  # on CPU accelerate counts the ranks only with use_cpu: each then gets its own rows
    kw.update(overrides)
    torch.manual_seed(0)
    extra = {} if cls is PlainT else dict(balancer=plugins or [], group_by="task")
    trainer = cls(model=Net(), args=TrainingArguments(**kw), train_dataset=data(), **extra)
    trainer.seen = []
    return trainer

def finish(trainer, key, report):
    engine = trainer.model_wrapped
    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps, enabled=engine.zero_optimization_stage() == 3):
        torch.save([p.detach().clone() for p in ps], out / f"{key}_params{rank}.pt")
    entry = {"seen": trainer.seen, "grad_norm": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
             "global_steps": engine.global_steps, "engine": type(engine).__name__}
    if isinstance(trainer, BalancedTrainer):
        opt = trainer.balancer
        entry.update(backend=type(opt.backend).__name__, steps=opt._step_count, weights=opt.last_stats.weights.tolist(),
                     names=list(opt.last_stats.names), clip_coef=float(opt.last_stats.clip_coef))
    report[key] = entry

report = {}
for stage in (2, 3):
    for key, cls, clip in (("plain", PlainT, 0.0), ("none", BalancedT, 0.0), ("plain_clip", PlainT, CLIP),
                           ("none_clip", BalancedT, CLIP)):
        trainer = make(cls, stage, clip)
        trainer.train()
        finish(trainer, f"zero{stage}_{key}", report)
    ckpt = out / f"ckpt{stage}"
    trainer = make(BalancedT, stage, CLIP, ["task_norm"], output_dir=str(ckpt), save_strategy="steps", save_steps=2)
    trainer.train()
    finish(trainer, f"zero{stage}_task_norm", report)
    dist.barrier()
    states = sorted(glob.glob(str(ckpt / "checkpoint-2" / "global_step2" / "*model_states.pt")))
    saved = torch.load(states[0], weights_only=False, map_location="cpu")
    report[f"zero{stage}_saved_section"] = sorted(saved.get("balancer", {}).keys())
    trainer = make(BalancedT, stage, CLIP, ["task_norm"], output_dir=str(ckpt))
    trainer.train(resume_from_checkpoint=str(ckpt / "checkpoint-2"))
    finish(trainer, f"zero{stage}_resumed", report)

def refused(name, **kwargs):
    try:
        make(BalancedT, 2, 0.0, ["task_norm"], **kwargs)
    except BalancerError as exc:
        report[name] = f"{type(exc).__name__}: {exc}"

refused("refused_gas", gradient_accumulation_steps=2)
refused("refused_offload", ds_extra={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
refused("refused_pipeline", ds_extra={"pipeline": {"stages": 2}})

(out / f"report{rank}.json").write_text(json.dumps(report))
dist.barrier()
os._exit(0)  # skip gloo's C++ teardown, which about one run in 50 aborts after all is written
"""


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(1)
    names = [list(TASKS)[i % 3] for i in range(48)]
    x = torch.tensor(torch.randn(48, 6, generator=gen).tolist())  # the values the dataset round-trips
    y = torch.randn(48, 3, generator=gen) * torch.tensor([TASKS[t] for t in names])[:, None]
    return x, torch.tensor(y.tolist()), names


@functools.cache
def _reference(seen: tuple[tuple[int, ...], ...]) -> tuple[list[torch.Tensor], list[float], dict[str, float]]:
    """One process, plain torch Balancer with ``task_norm`` and the clip, on each step's global batch."""
    x, y, names = _data()
    torch.manual_seed(0)
    model = Net()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=LR), plugins=["task_norm"])
    norms = []
    for rows in seen:
        for task in TASKS:
            mine = [i for i in rows if names[i] == task]
            if not mine:
                continue
            per_row = ((model(x[mine]) - y[mine]) ** 2).mean(dim=1)
            with opt.group(task):
                (per_row.sum() / len(rows)).backward()  # this group's share of the global batch's mean loss
        norms.append(float(opt.clip_grad_norm_(CLIP)))
        opt.step()
        opt.zero_grad()
    weights = dict(zip(opt.last_stats.names, opt.last_stats.weights.tolist(), strict=True))
    return [p.detach().clone() for p in model.parameters()], norms, weights


def _relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected, strict=True))


@pytest.fixture(scope="module")
def runs(launch_once):
    path = launch_once.tmp_path
    # 420 s: the first DeepSpeed launch on a machine JIT-compiles its shm op (about 70 s on 2 cores).
    launch_once(SCRIPT, json.dumps(TASKS), str(STEPS), str(LR), str(CLIP), timeout=420)
    return path, [json.loads((path / f"report{rank}.json").read_text()) for rank in range(2)]


def _params(path: Path, key: str, rank: int) -> list[torch.Tensor]:
    return torch.load(path / f"{key}_params{rank}.pt", weights_only=True)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("clipped", [False, True])
def test_no_plugin_run_equals_plain_trainer(stage, clipped, runs):
    path, reports = runs
    suffix = "_clip" if clipped else ""
    for rank in range(2):
        plain, balanced = reports[rank][f"zero{stage}_plain{suffix}"], reports[rank][f"zero{stage}_none{suffix}"]
        assert balanced["seen"] == plain["seen"]  # the same data
        assert balanced["engine"] == "DeepSpeedEngine" and balanced["backend"] == "DeepSpeedBackend"
        assert balanced["steps"] == balanced["global_steps"] == plain["global_steps"] == STEPS
        expected = _params(path, f"zero{stage}_plain{suffix}", rank)
        assert _relative_error(_params(path, f"zero{stage}_none{suffix}", rank), expected) <= 1e-5
        assert balanced["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
        if clipped:
            assert all(n > CLIP for n in plain["grad_norm"])  # DeepSpeed's clip was active in every step
            assert balanced["clip_coef"] < 1


def _global_batches(report: list[dict], key: str) -> tuple[tuple[int, ...], ...]:
    per_rank = [r[key]["seen"] for r in report]
    for rows_0, rows_1 in zip(*per_rank, strict=True):
        assert not set(rows_0) & set(rows_1)  # data parallel: the ranks see different rows of each step
    return tuple(tuple(a + b) for a, b in zip(*per_rank, strict=True))


@pytest.mark.parametrize("stage", STAGES)
def test_task_norm_equals_one_process_on_the_global_batch(stage, runs):
    path, reports = runs
    key = f"zero{stage}_task_norm"
    expected, norms, weights = _reference(_global_batches(reports, key))
    for rank in range(2):
        entry = reports[rank][key]
        assert _relative_error(_params(path, key, rank), expected) <= 1e-5
        got = dict(zip(entry["names"], entry["weights"], strict=True))
        assert got == pytest.approx(weights, rel=1e-5)
        # the logged grad_norm is the norm of the balanced update (before DeepSpeed's clip)
        assert entry["grad_norm"] == pytest.approx(norms, rel=1e-5)
        assert entry["steps"] == entry["global_steps"] == STEPS


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_stores_the_balancer_and_resume_is_exact(stage, runs):
    path, reports = runs
    assert "plugins" in json.dumps(reports[0][f"zero{stage}_saved_section"])
    for rank in range(2):
        resumed = reports[rank][f"zero{stage}_resumed"]
        assert resumed["steps"] == STEPS  # the Balancer's step count came back from the checkpoint
        full = _params(path, f"zero{stage}_task_norm", rank)
        assert _relative_error(_params(path, f"zero{stage}_resumed", rank), full) <= 1e-6


def test_unsupported_settings_are_refused_before_training(runs):
    _, reports = runs
    for report in reports:
        assert report["refused_gas"].startswith("DeepSpeedUnsupportedError")
        assert "gradient_accumulation_steps = 2" in report["refused_gas"]
        assert "offload_optimizer (device cpu)" in report["refused_offload"]
        assert "pipeline parallelism" in report["refused_pipeline"]
