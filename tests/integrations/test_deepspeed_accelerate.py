"""DeepSpeed through accelerate (``Accelerator(deepspeed_plugin=...)``, hence ``Trainer(deepspeed=...)``)
on 2 CPU ranks: ZeRO-2 and ZeRO-3.

``accelerator.backward`` steps the engine itself; :func:`balancer.integrations.accelerate.prepare`
puts a Balancer on the engine that defers that step while groups are pending. Checked: a balanced
run equals one process on the global batch (the reference of ``integrations.deepspeed``), the
no-plugin run equals the plain accelerate + DeepSpeed loop, and the refusals. One launch trains
every variant (each on a fresh accelerator); the tests read its outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.integrations.heads_reference import GROUPS, STEPS, reference, relative_error

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

STAGES = (2, 3)

SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from accelerate.state import AcceleratorState, GradientState
import balancer
from balancer import Balancer
from balancer.errors import BalancerError, CaptureError
from balancer.integrations.accelerate import prepare
from balancer.integrations.deepspeed import DeepSpeedUnsupportedError
from balancer.integrations._hf_deepspeed import wrap_deepspeed_engine

out, GROUPS, STEPS = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(16, 3) for n in GROUPS})
    def forward(self, x, name):
        return self.heads[name](self.trunk(x))

def rows(step, name, rank):
    gen = torch.Generator().manual_seed(1000 * step + sorted(GROUPS).index(name))
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * GROUPS[name]
    return x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]

def accelerator(stage, gas=1, clipping=0.0):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clipping,
           "steps_per_print": 10**9, "zero_optimization": {"stage": stage}}
    return Accelerator(gradient_accumulation_steps=gas,
                       deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))

def params(acc, model):
    import deepspeed
    ps = list(model.parameters())
    with deepspeed.zero.GatheredParameters(ps, enabled=model.zero_optimization_stage() == 3):
        return [p.detach().float().clone() for p in ps]

def mse(model, name, step, rank):
    return torch.nn.functional.mse_loss(model(*[rows(step, name, rank)[0]], name), rows(step, name, rank)[1])

rank = int(os.environ["RANK"])
report = {}
for stage in (2, 3):
    for mode in ("plain", "none", "task_norm"):
        acc = accelerator(stage)
        torch.manual_seed(0)
        model = Net()
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if mode == "plain":
            model, optimizer = acc.prepare(model, adamw)
        else:
            plugins = [] if mode == "none" else ["task_norm"]
            model, optimizer = prepare(acc, model, Balancer(adamw, plugins=plugins))
            opt = balancer.unwrap(optimizer)
        for step in range(STEPS):
            if mode == "plain":
                acc.backward(sum(mse(model, n, step, rank) for n in GROUPS))
            else:
                for n in GROUPS:
                    with opt.group(n):
                        acc.backward(mse(model, n, step, rank))
            optimizer.step()
            optimizer.zero_grad()
        key = f"zero{stage}_{mode}"
        torch.save(params(acc, model), out / f"{key}_params{rank}.pt")
        assert acc.distributed_type == "DEEPSPEED", acc.distributed_type  # not a silent fallback
        entry = {"global_steps": model.global_steps}
        if mode != "plain":
            entry.update(weights=opt.last_stats.weights.tolist(), backend=type(opt.backend).__name__,
                         steps=opt._step_count)
        report[key] = entry
        acc.free_memory()

try:  # accumulation through accelerate: every group's backward must be a reduction boundary
    acc = accelerator(2, gas=2)
    model = Net()
    prepare(acc, model, Balancer(torch.optim.AdamW(model.parameters()), plugins=["task_norm"]))
except DeepSpeedUnsupportedError as exc:
    report["refused_gas"] = str(exc)

acc = accelerator(2, clipping=1.0)  # DeepSpeed clips the balanced update; clipping again is refused
model = Net()
model, opt = prepare(acc, model, Balancer(torch.optim.AdamW(model.parameters()), plugins=["task_norm"]))
with opt.group("small"):
    acc.backward(mse(model, "small", 0, rank))
try:
    acc.clip_grad_norm_(model.parameters(), 1.0)
except CaptureError as exc:
    report["refused_clip"] = str(exc)
opt.step()
report["clipped_norm"] = float(opt.last_stats.grad_norm)

acc = accelerator(2)  # a Balancer handed to DeepSpeed by accelerator.prepare itself cannot balance
model = Net()
model, optimizer = acc.prepare(model, Balancer(torch.optim.AdamW(model.parameters())))
try:
    wrap_deepspeed_engine(acc.deepspeed_engine_wrapped.engine)
except BalancerError as exc:
    report["refused_balancer_client"] = str(exc)

(out / f"report{rank}.json").write_text(json.dumps(report))
dist.barrier()
os._exit(0)  # skip gloo's C++ teardown, which about one run in 50 aborts after all is written
"""


@pytest.fixture(scope="module")
def runs(launch_once):
    path = launch_once.tmp_path
    # 420 s: the first DeepSpeed launch on a machine JIT-compiles its shm op (about 70 s on 2 cores).
    launch_once(SCRIPT, json.dumps(GROUPS), str(STEPS), timeout=420)
    reports = [json.loads((path / f"report{rank}.json").read_text()) for rank in range(2)]
    return path, reports


def _params(path, key: str, rank: int) -> list[torch.Tensor]:
    return torch.load(path / f"{key}_params{rank}.pt", weights_only=True)


@pytest.mark.parametrize("stage", STAGES)
def test_balanced_run_matches_one_process_on_the_global_batch(stage, runs):
    path, reports = runs
    expected, weights = reference()
    key = f"zero{stage}_task_norm"
    for rank in range(2):
        assert relative_error(_params(path, key, rank), expected) < 1e-5
        entry = reports[rank][key]
        assert entry["backend"] == "DeepSpeedBackend"
        torch.testing.assert_close(torch.tensor(entry["weights"], dtype=torch.float64), weights, rtol=1e-5, atol=0)
        assert entry["steps"] == entry["global_steps"] == STEPS  # accelerate's engine.step() calls were deferred
    assert reports[0][key]["weights"] == reports[1][key]["weights"]


@pytest.mark.parametrize("stage", STAGES)
def test_no_plugin_run_matches_the_plain_accelerate_deepspeed_loop(stage, runs):
    path, reports = runs
    for rank in range(2):
        plain = _params(path, f"zero{stage}_plain", rank)
        assert relative_error(_params(path, f"zero{stage}_none", rank), plain) < 1e-6
        assert reports[rank][f"zero{stage}_plain"]["global_steps"] == STEPS


def test_unsupported_settings_and_double_clipping_are_refused(runs):
    _, reports = runs
    for report in reports:
        assert "gradient_accumulation_steps = 2" in report["refused_gas"]
        assert "clip twice" in report["refused_clip"] and "gradient_clipping" in report["refused_clip"]
        assert report["clipped_norm"] > 0  # DeepSpeed's own clip, reported from the Gram matrix
        assert "optimizer is a Balancer" in report["refused_balancer_client"]
