"""Clipping under data parallelism, 2 CPU ranks (gloo): DDP, FSDP2 and DeepSpeed ZeRO-2/3 clip the
balanced update exactly as one process does on the global batch.

One process with a plain Balancer and the same ``max_grad_norm`` (itself checked against the
explicit float64 update in ``tests/balancer/test_clip.py``) is the reference: the parameters after
3 steps and every step's ``last_stats.grad_norm`` must match. The norm is global: under FSDP2 and
ZeRO each rank holds a shard, and the Gram matrix, summed over ranks, gives the whole update's norm.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from balancer import Balancer

STEPS = 3
GROUPS = {"small": 0.1, "mid": 1.0, "large": 30.0}
MAX_NORM = 0.5

COMMON = """
import json, math, os, sys, torch, torch.distributed as dist
from pathlib import Path

out, groups = Path(sys.argv[1]), json.loads(sys.argv[2])
max_norm, steps = float(sys.argv[3]), int(sys.argv[4])
mse = torch.nn.functional.mse_loss

def batch(step, name):  # this rank's half of the global batch of 8 rows
    gen = torch.Generator().manual_seed(1000 * step + sorted(groups).index(name))
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * groups[name]
    rank = dist.get_rank()
    return x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]

def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

def total_loss(model, step):  # the step's losses in one piece: what a loop without the Balancer backpropagates
    x, y = batch(step + 50, "mid")
    loss = 0.3 * mse(model(x), y)
    for name in groups:
        x, y = batch(step, name)
        loss = loss + mse(model(x), y)
    return loss
"""

TORCH_SCRIPT = (
    COMMON
    + """
from balancer import Balancer

dist.init_process_group("gloo")
rank = dist.get_rank()

def wrapped(kind):
    model = make_model()
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model[0]); fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model)

def gathered(model):
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [p.detach().clone() for p in full]

def run_plain(kind):  # DDP / FSDP2 alone: one backward of the summed loss, torch's clip, AdamW
    model = wrapped(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        total_loss(model, step).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return gathered(model), []

def run(kind, how, norm_type, plugins=("task_norm",)):
    model = wrapped(kind)
    clip = {"max_grad_norm": max_norm} if how == "max_grad_norm" else {}
    opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=list(plugins), **clip)
    norms = []
    for step in range(steps):
        x, y = batch(step + 50, "mid")
        (0.3 * mse(model(x), y)).backward()  # ungrouped
        for name in groups:
            x, y = batch(step, name)
            with opt.group(name):
                mse(model(x), y).backward()
        if how == "call":
            norms.append(opt.clip_grad_norm_(max_norm, norm_type).item())
        opt.step()
        if how == "max_grad_norm":
            norms.append(opt.last_stats.grad_norm.item())
        opt.zero_grad()
    return gathered(model), norms

results = {}
for kind in ("ddp", "fsdp"):
    runs = {f"{kind}-{how}-{norm}": (lambda h=how, n=norm: run(kind, h, n)) for how, norm in
            (("max_grad_norm", 2.0), ("call", 2.0), ("call", math.inf))}
    runs[f"{kind}-noplugin"] = lambda: run(kind, "max_grad_norm", 2.0, plugins=())
    runs[f"{kind}-plain"] = lambda: run_plain(kind)
    for key, go in runs.items():
        params, norms = go()
        torch.save(params, out / f"{key}-{rank}.pt")
        results[key] = norms
(out / f"norms{rank}.json").write_text(json.dumps(results))
dist.barrier()
os._exit(0)  # skip gloo's and DDP's C++ teardown, which about one run in 50 aborts after all is written
"""
)


def _batch(step: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + sorted(GROUPS).index(name))
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * GROUPS[name]


def _reference(norm_type: float) -> tuple[list[torch.Tensor], list[float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=["task_norm"])
    mse = torch.nn.functional.mse_loss
    norms = []
    for step in range(STEPS):
        x, y = _batch(step + 50, "mid")
        (0.3 * mse(model(x), y)).backward()
        for name in GROUPS:
            x, y = _batch(step, name)
            with opt.group(name):
                mse(model(x), y).backward()
        norms.append(opt.clip_grad_norm_(MAX_NORM, norm_type).item())
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], norms


@pytest.fixture(scope="module")
def torch_runs(launch_once):
    path = launch_once.tmp_path
    launch_once(TORCH_SCRIPT, json.dumps(GROUPS), str(MAX_NORM), str(STEPS), timeout=240)
    return path, [json.loads((path / f"norms{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize(("how", "norm_type"), [("max_grad_norm", 2.0), ("call", 2.0), ("call", math.inf)])
def test_clip_matches_one_process_on_the_global_batch(torch_runs, kind, how, norm_type):
    path, norms = torch_runs
    key = f"{kind}-{how}-{norm_type}"
    ref_params, ref_norms = _reference(norm_type)
    assert max(ref_norms) > 10 * MAX_NORM  # the clip engaged at every step
    for rank in range(2):
        assert norms[rank][key] == pytest.approx(ref_norms, rel=1e-5)
        for got, expected in zip(torch.load(path / f"{key}-{rank}.pt"), ref_params, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


DEEPSPEED_SCRIPT = (
    COMMON
    + """
import deepspeed
from balancer.errors import CaptureError
from balancer.integrations.deepspeed import initialize

deepspeed.init_distributed()
rank = dist.get_rank()

def config(stage, ds_clip, section):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": ds_clip,
            "steps_per_print": 10**9, "zero_optimization": {"stage": stage},
            "balancer": {"plugins": ["task_norm"], **section}}

def params_of(engine, stage):
    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps, enabled=stage == 3):
        return [p.detach().float().clone() for p in ps]

def run_plain(stage):  # DeepSpeed alone: one backward of the summed loss, its own gradient_clipping
    model = make_model()
    cfg = {k: v for k, v in config(stage, max_norm, {}).items() if k != "balancer"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                           config=cfg)
    for step in range(steps):
        engine.backward(total_loss(engine, step))
        engine.step()
    return params_of(engine, stage)

def run(stage, how):
    model = make_model()
    ds_clip = max_norm if how in ("deepspeed", "noplugin") else 0.0
    section = {"max_grad_norm": max_norm} if how in ("max_grad_norm", "both") else {}
    if how == "noplugin":
        section["plugins"] = []
    if how == "both":
        ds_clip = max_norm
    engine, opt, _, _ = initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                   config=config(stage, ds_clip, section))
    norms, ds_norms = [], []
    for step in range(steps):
        x, y = batch(step + 50, "mid")
        engine.backward(0.3 * mse(engine(x), y))  # ungrouped
        for name in groups:
            x, y = batch(step, name)
            with opt.group(name):
                engine.backward(mse(engine(x), y))
        if how == "call":
            opt.clip_grad_norm_(max_norm)
        opt.step()
        norms.append([opt.last_stats.grad_norm.item(), opt.last_stats.clip_coef.item()])
        ds_norms.append(float(engine.get_global_grad_norm()))
        opt.zero_grad()
    return params_of(engine, stage), norms, ds_norms

report = {}
for stage in (2, 3):
    for how in ("max_grad_norm", "call", "deepspeed", "noplugin"):
        params, norms, ds_norms = run(stage, how)
        torch.save(params, out / f"zero{stage}-{how}-{rank}.pt")
        report[f"zero{stage}-{how}"] = {"norms": norms, "deepspeed": ds_norms}
    torch.save(run_plain(stage), out / f"zero{stage}-plain-{rank}.pt")
    try:
        run(stage, "both")
    except CaptureError as exc:
        report[f"zero{stage}-both"] = str(exc)
(out / f"ds{rank}.json").write_text(json.dumps(report))
dist.barrier()
os._exit(0)  # as above: no C++ teardown after the results are written
"""
)


@pytest.fixture(scope="module")
def deepspeed_runs(launch_once):
    pytest.importorskip("deepspeed")
    path = launch_once.tmp_path
    # 420 s: the first DeepSpeed launch on a machine JIT-compiles its shm op (about 70 s on 2 cores).
    launch_once(DEEPSPEED_SCRIPT, json.dumps(GROUPS), str(MAX_NORM), str(STEPS), timeout=420)
    return path, [json.loads((path / f"ds{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("how", ["max_grad_norm", "call", "deepspeed"])
def test_zero_clip_matches_one_process_and_deepspeeds_own_norm(deepspeed_runs, stage, how):
    """The Balancer's clip, or DeepSpeed's ``gradient_clipping`` of the balanced update (which the
    Balancer then reports), both give the one-process clipped run; DeepSpeed's own global norm
    agrees with the Balancer's: the update's norm before its clip, or the clipped norm after ours."""
    path, reports = deepspeed_runs
    ref_params, ref_norms = _reference(2.0)
    key = f"zero{stage}-{how}"
    for rank in range(2):
        entry = reports[rank][key]
        norms = [n for n, _ in entry["norms"]]
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        clipped = [n * c for n, c in entry["norms"]]
        assert entry["deepspeed"] == pytest.approx(norms if how == "deepspeed" else clipped, rel=1e-5)
        for got, expected in zip(torch.load(path / f"{key}-{rank}.pt"), ref_params, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_clip_twice_is_refused(deepspeed_runs, stage):
    _, reports = deepspeed_runs
    for rank in range(2):
        assert "gradient_clipping" in reports[rank][f"zero{stage}-both"]
        assert "clip twice" in reports[rank][f"zero{stage}-both"]


def _same_params(path, key_a: str, key_b: str) -> None:
    for rank in range(2):
        ours, theirs = torch.load(path / f"{key_a}-{rank}.pt"), torch.load(path / f"{key_b}-{rank}.pt")
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_no_plugin_clipped_equals_the_framework_alone(torch_runs, kind):
    """Balancer without plugins, groups captured apart, max_grad_norm: the parameters of DDP / FSDP2
    with one backward of the summed loss and torch.nn.utils.clip_grad_norm_ (same data, same clip)."""
    _same_params(torch_runs[0], f"{kind}-noplugin", f"{kind}-plain")


@pytest.mark.parametrize("stage", [2, 3])
def test_no_plugin_with_deepspeed_clipping_equals_deepspeed_alone(deepspeed_runs, stage):
    """Balancer without plugins on an engine with gradient_clipping: the parameters of the engine
    alone on the summed loss, clipped by DeepSpeed (same data, same clip)."""
    _same_params(deepspeed_runs[0], f"zero{stage}-noplugin", f"zero{stage}-plain")
