"""DeepSpeed ZeRO 0-3 on 2 CPU ranks (gloo): the same parameters as one process on the global batch.

Each torchrun launch costs seconds of imports (and the first one JIT-compiles DeepSpeed's shm op,
about a minute), so one launch trains every configuration in turn, each on a fresh engine, and
also runs the refusal and group-mismatch cases; the tests below read its outputs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from balancer.errors import ConfigError
from tests.integrations.heads_reference import GROUPS, STEPS, Net, reference, relative_error

pytest.importorskip("deepspeed")

FP32 = {
    "zero0": {"zero": {"stage": 0}},
    "zero1_by_hand": {"zero": {"stage": 1}, "how": "by_hand"},
    "zero1_overlap": {"zero": {"stage": 1, "overlap_comm": True}},
    "zero2": {"zero": {"stage": 2}},
    "zero2_overlap_noncontiguous": {"zero": {"stage": 2, "overlap_comm": True, "contiguous_gradients": False}},
    "zero3_json_path": {"zero": {"stage": 3}, "how": "path"},
    "zero3_noncontiguous": {"zero": {"stage": 3, "overlap_comm": False, "contiguous_gradients": False}},
    "zero0_ungrouped": {"zero": {"stage": 0}, "ungrouped": True},
    "zero2_ungrouped_torch_backward": {"zero": {"stage": 2}, "ungrouped": True, "torch": True},
    "zero3_torch_backward": {"zero": {"stage": 3}, "torch": True},
}
BF16 = {
    "bf16_zero1_fp32_accum": {"zero": {"stage": 1}, "bf16": True, "accum": "fp32"},
    "bf16_zero2": {"zero": {"stage": 2}, "bf16": True},
    "bf16_zero2_fp32_accum": {"zero": {"stage": 2}, "bf16": True, "accum": "fp32"},
    "bf16_zero3": {"zero": {"stage": 3}, "bf16": True},
}
BF16_RTOL = 1e-2  # bf16 weights carry 8 mantissa bits: 2**-8 = 3.9e-3 per rounding

COMMON = '''
import json, os, sys, torch, torch.distributed as dist, deepspeed
from pathlib import Path
from balancer import Balancer
from balancer.integrations.deepspeed import initialize

GROUPS = json.loads(sys.argv[3])
deepspeed.init_distributed()  # gloo on CPU

class Net(torch.nn.Module):
    """A shared trunk and one head per group: heads get no gradient from the other groups."""
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(16, 3) for n in GROUPS})
    def forward(self, x, name):
        return self.heads[name](self.trunk(x))

def make_model():
    torch.manual_seed(0)
    return Net()

def config(zero, bf16=False, accum=None, plugins=("task_norm",)):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "steps_per_print": 10**9, "zero_optimization": zero, "balancer": {"plugins": list(plugins)}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if accum:
        cfg["data_types"] = {"grad_accum_dtype": accum}
    return cfg

def rows(step, name, rank, lo=0, hi=4):
    gen = torch.Generator().manual_seed(1000 * step + sorted(GROUPS).index(name))
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * GROUPS[name]
    return x[4 * rank + lo : 4 * rank + hi], y[4 * rank + lo : 4 * rank + hi]

def loss(engine, name, x, y):
    dtype = next(engine.module.parameters()).dtype
    return torch.nn.functional.mse_loss(engine(x.to(dtype), name).float(), y)

def train(engine, opt, steps, first=0, names=None, ungrouped=False, torch_style=False):
    rank = dist.get_rank()
    backward = (lambda l: l.backward()) if torch_style else engine.backward
    for step in range(first, first + steps):
        if ungrouped:  # outside every group: added to the update with weight 1
            backward(0.3 * loss(engine, "mid", *rows(step + 50, "mid", rank)))
        for name in names or GROUPS:
            with opt.group(name):
                if name == "large":  # two backward passes in one block add up (each half of this rank's rows)
                    for lo in (0, 2):
                        backward(0.5 * loss(engine, name, *rows(step, name, rank, lo, lo + 2)))
                else:
                    backward(loss(engine, name, *rows(step, name, rank)))
        opt.step()
        opt.zero_grad()

def params(engine):
    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps, enabled=engine.zero_optimization_stage() == 3):
        return [p.detach().float().clone() for p in ps]
'''

MATRIX_SCRIPT = (
    COMMON
    + """
from balancer import GroupMismatchError
from balancer.errors import CaptureError, StateDictError
from balancer.integrations.deepspeed import DeepSpeedUnsupportedError

out, variants = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = dist.get_rank()
report = {}
for key, spec in variants.items():
    model, how = make_model(), spec.get("how", "dict")
    cfg = config(spec["zero"], spec.get("bf16", False), spec.get("accum"))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    entry = {}
    if how == "by_hand":
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=cfg)
        opt = Balancer(engine, plugins=["task_norm"])
        engine.save_checkpoint(str(out / "by_hand"))  # the Balancer announced itself to the engine
        entry["by_hand_save"] = "balancer" in torch.load(
            out / "by_hand" / "global_step0" / "mp_rank_00_model_states.pt", weights_only=False
        )
    else:
        if how == "path":
            path = out / f"ds_{key}_{rank}.json"
            path.write_text(json.dumps(cfg))
            cfg = str(path)
        engine, opt, _, _ = initialize(model=model, optimizer=adamw, config=cfg)
    train(engine, opt, int(sys.argv[4]), ungrouped=spec.get("ungrouped", False), torch_style=spec.get("torch", False))
    torch.save(params(engine), out / f"{key}_params{rank}.pt")
    entry.update(weights=opt.last_stats.weights.tolist(), source=type(opt.backend.source).__name__,
                 extra_bytes=opt.backend.extra_bytes(), numel=opt.backend.source.numel)
    report[key] = entry

refused = {
    "offload": config({"stage": 2, "offload_optimizer": {"device": "cpu"}}) | {"zero_force_ds_cpu_optimizer": False},
    "gas": config({"stage": 2}) | {"gradient_accumulation_steps": 2, "train_batch_size": 16},
}
for key, cfg in refused.items():
    model = make_model()
    try:
        initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=cfg)
    except DeepSpeedUnsupportedError as exc:
        report["refused_" + key] = str(exc)

model = make_model()
engine, opt, _, _ = initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                               config=config({"stage": 2}))
with opt.group("small"):
    engine.backward(loss(engine, "small", *rows(0, "small", rank)))
try:  # a DeepSpeed habit: engine.step() would apply an uncombined gradient
    engine.step()
except CaptureError as exc:
    report["engine_step"] = str(exc)
opt.step()
opt.zero_grad()
try:  # rank 1 takes one group only: both ranks must raise, neither may hang
    train(engine, opt, 1, names=list(GROUPS)[:1] if rank == 1 else None)
except GroupMismatchError as exc:
    report["mismatch"] = str(exc)
(out / f"report{rank}.json").write_text(json.dumps(report))
dist.barrier()
os._exit(0)  # skip gloo's C++ teardown, which about one run in 50 aborts after all is written
"""
)

CHECKPOINT_SCRIPT = (
    COMMON
    + """
out, mode = Path(sys.argv[1]), sys.argv[2]
rank = dist.get_rank()
plugins = [{"name": "task_norm", "options": {"beta": 0.5, "target": "ema"}}]  # stateful: EMA of norms

def build():
    model = make_model()
    return initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                      config=config({"stage": 2}, plugins=plugins))[:2]

if mode == "save":
    engine, opt = build()
    train(engine, opt, 6)
    torch.save(params(engine), out / f"straight{rank}.pt")
    engine, opt = build()
    train(engine, opt, 3)
    engine.save_checkpoint(str(out / "ckpt"), tag="t3", client_state={"epoch": 7})
    info = {"states": repr(opt.plugin_states)}
else:
    engine, opt = build()
    path, client = engine.load_checkpoint(str(out / "ckpt"), tag="t3")
    info = {"client": sorted(client), "epoch": client["epoch"], "step": opt._step_count,
            "states": repr(opt.plugin_states)}
    train(engine, opt, 3, first=3)
    torch.save(params(engine), out / f"resumed{rank}.pt")
(out / f"{mode}{rank}.json").write_text(json.dumps(info))
dist.barrier()
os._exit(0)  # skip gloo's C++ teardown, which about one run in 50 aborts after all is written
"""
)


@pytest.fixture(scope="module")
def matrix(launch_once):
    path = launch_once.tmp_path
    variants = {**FP32, **BF16}
    # 420 s: the first DeepSpeed launch on a machine JIT-compiles its shm op (about 70 s on 2 cores).
    launch_once(MATRIX_SCRIPT, json.dumps(variants), json.dumps(GROUPS), str(STEPS), timeout=420)
    reports = [json.loads((path / f"report{rank}.json").read_text()) for rank in range(2)]
    return path, reports


@pytest.mark.parametrize("key", list(FP32))
def test_fp32_matches_one_process_on_the_global_batch(key, matrix):
    path, reports = matrix
    expected, weights = reference(FP32[key].get("ungrouped", False))
    for rank in range(2):
        got = torch.load(path / f"{key}_params{rank}.pt", weights_only=True)
        assert relative_error(got, expected) < 1e-5, key
        ranked = torch.tensor(reports[rank][key]["weights"], dtype=torch.float64)
        torch.testing.assert_close(ranked, weights, rtol=1e-5, atol=0)
    assert reports[0][key]["weights"] == reports[1][key]["weights"]  # stats identical on every rank


@pytest.mark.parametrize("key", list(BF16))
def test_bf16_matches_within_bf16_rounding(key, matrix):
    path, reports = matrix
    expected, weights = reference()
    for rank in range(2):
        got = torch.load(path / f"{key}_params{rank}.pt", weights_only=True)
        assert relative_error(got, expected) < BF16_RTOL, key
        ranked = torch.tensor(reports[rank][key]["weights"], dtype=torch.float64)
        torch.testing.assert_close(ranked, weights, rtol=BF16_RTOL, atol=0)
    assert reports[0][key]["weights"] == reports[1][key]["weights"]


def test_rows_hold_the_local_partition_only(matrix):
    _, reports = matrix
    sources = {key: reports[0][key]["source"] for key in {**FP32, **BF16}}
    assert sources["zero0"] == "Stage0Source"
    assert sources["zero2"] == sources["zero1_overlap"] == "Zero12Source"
    assert sources["zero3_noncontiguous"] == "Zero3Source"
    assert sources["bf16_zero1_fp32_accum"] == "Bf16OptimizerSource"
    total = sum(p.numel() for p in Net().parameters())
    for key, spec in FP32.items():
        entry, ungrouped = reports[0][key], spec.get("ungrouped", False)
        assert entry["numel"] <= total // 2 + 64, (key, entry["numel"], total)  # about half the model per rank
        assert entry["extra_bytes"] == (len(GROUPS) + ungrouped) * entry["numel"] * 4  # k rows (+ ungrouped)


def test_groups_that_differ_across_ranks_raise_on_every_rank(matrix):
    _, reports = matrix
    for rank in range(2):
        message = reports[rank]["mismatch"]
        assert "rank 0: enter group 'mid'" in message
        assert "rank 1: step() with groups ['small']" in message


def test_unsupported_configurations_are_refused_clearly(matrix):
    _, reports = matrix
    for rank in range(2):
        assert "offload_optimizer" in reports[rank]["refused_offload"]
        assert "gradient_accumulation_steps = 2" in reports[rank]["refused_gas"]
        assert "fix: set it to 1" in reports[rank]["refused_gas"]


def test_engine_step_with_pending_groups_is_refused(matrix):
    _, reports = matrix
    for rank in range(2):
        assert "groups ['small']" in reports[rank]["engine_step"] and "Call opt.step()" in reports[rank]["engine_step"]


def test_by_hand_balancer_checkpoints_its_state_through_the_engine(matrix):
    _, reports = matrix
    assert reports[0]["zero1_by_hand"]["by_hand_save"] is True


def test_checkpoint_resume_continues_identically(launch, tmp_path):
    launch(CHECKPOINT_SCRIPT, "save", json.dumps(GROUPS))
    launch(CHECKPOINT_SCRIPT, "load", json.dumps(GROUPS))
    for rank in range(2):
        saved = json.loads((tmp_path / f"save{rank}.json").read_text())
        loaded = json.loads((tmp_path / f"load{rank}.json").read_text())
        assert loaded["epoch"] == 7 and "balancer" not in loaded["client"]  # the user's client state, ours removed
        assert loaded["step"] == 3
        assert loaded["states"] == saved["states"]
        straight = torch.load(tmp_path / f"straight{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=True)
        for a, b in zip(resumed, straight, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore")  # importing deepspeed warns about the accelerator it picks
def test_initialize_reports_a_bad_balancer_section_before_building_anything(tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from balancer.integrations.deepspeed import initialize

    model = torch.nn.Linear(2, 2)
    bad = {"train_micro_batch_size_per_gpu": 1, "balancer": {"plugins": ["no_such_plugin"], "extra": 1}}
    with pytest.raises(ConfigError) as info:
        initialize(model=model, config=bad)
    paths = [path for path, _ in info.value.errors]
    assert "balancer.extra" in paths and "balancer.plugins.0.name" in paths
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"balancer": {"plugins": [{"name": "task_norm", "options": {"alpha": 7}}]}}))
    with pytest.raises(ConfigError, match=r"balancer\.plugins\.0\.options\.alpha"):
        initialize(model=model, config=str(path))
    with pytest.raises(ConfigError, match="missing"):
        initialize(model=model, config={"train_micro_batch_size_per_gpu": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        initialize(model=model, config=str(tmp_path / "nope.json"))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ConfigError, match="binary.json"):
        initialize(model=model, config=str(binary))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        initialize(model=model, config=str(listed))
