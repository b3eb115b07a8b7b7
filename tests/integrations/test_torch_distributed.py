"""DDP and FSDP2 on 2 CPU ranks (gloo): the same parameters as one process on the global batch."""

from __future__ import annotations

import json

import pytest
import torch

from balancer import Balancer

STEPS = 3
GROUPS = {"small": 0.1, "mid": 1.0, "large": 30.0}  # gradient scales differ by 300x

RANK_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
from balancer import Balancer, CaptureError, GroupMismatchError

out, mode = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
if mode == "fsdp":
    from torch.distributed.fsdp import fully_shard
    fully_shard(model[0]); fully_shard(model)
else:
    model = torch.nn.parallel.DistributedDataParallel(model)
opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=["task_norm"])
groups = json.loads(sys.argv[3])

def batch(step, name):
    gen = torch.Generator().manual_seed(1000 * step + sorted(groups).index(name))
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * groups[name]
    half = slice(rank * 4, rank * 4 + 4)
    return x[half], y[half]

try:
    for step in range({steps}):
        names = list(groups)
        if mode == "mismatch" and rank == 1:
            names = names[:1]  # rank 1 skips groups: every rank must raise, none may hang
        for name in names:
            with opt.group(name):
                x, y = batch(step, name)
                if mode in ("no_sync", "all_no_sync"):
                    # two micro-batches: the first one (or, wrongly, both) without DDP's all-reduce
                    with model.no_sync():
                        (torch.nn.functional.mse_loss(model(x[:2]), y[:2]) / 2).backward()
                    if mode == "all_no_sync":
                        with model.no_sync():
                            (torch.nn.functional.mse_loss(model(x[2:]), y[2:]) / 2).backward()
                    else:
                        (torch.nn.functional.mse_loss(model(x[2:]), y[2:]) / 2).backward()
                else:
                    torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
except (GroupMismatchError, CaptureError) as exc:
    (out / f"error{{rank}}.txt").write_text(str(exc))
    # Leave at once: every rank raised the same error, and tearing down DDP's reducer and gloo
    # after an aborted step can abort the process in C++ destructors ("terminate called...").
    os._exit(0)
params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
torch.save([p.detach().clone() for p in params], out / f"params{{rank}}.pt")
(out / f"weights{{rank}}.json").write_text(json.dumps(opt.last_stats.weights.tolist()))
(out / f"backend{{rank}}.txt").write_text(type(opt.backend).__name__)
dist.destroy_process_group()
""".format(steps=STEPS)


def _reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=["task_norm"])
    for step in range(STEPS):
        for name in GROUPS:
            gen = torch.Generator().manual_seed(1000 * step + sorted(GROUPS).index(name))
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * GROUPS[name]
            with opt.group(name):
                torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()], opt.last_stats.weights


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "no_sync"])
def test_two_ranks_match_one_process_on_the_global_batch(mode, launch, tmp_path):
    launch(RANK_SCRIPT, mode, json.dumps(GROUPS))
    expected, weights = _reference()
    backend = {"ddp": "ReplicatedBackend", "fsdp": "ShardedBackend", "no_sync": "ReplicatedBackend"}[mode]
    assert (tmp_path / "backend0.txt").read_text() == (tmp_path / "backend1.txt").read_text() == backend
    for rank in range(2):
        got = torch.load(tmp_path / f"params{rank}.pt", weights_only=True)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        ranked = json.loads((tmp_path / f"weights{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(ranked, dtype=torch.float64), weights, rtol=1e-5, atol=0)


def test_ranks_with_different_groups_all_raise(launch, tmp_path):
    launch(RANK_SCRIPT, "mismatch", json.dumps(GROUPS), timeout=120)
    for rank in range(2):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert "rank 0: enter group 'mid'" in message
        assert "rank 1: step() with groups ['small']" in message


def test_a_group_never_synchronized_is_refused_on_every_rank(launch, tmp_path):
    launch(RANK_SCRIPT, "all_no_sync", json.dumps(GROUPS), timeout=120)
    for rank in range(2):
        assert "differ across data-parallel ranks" in (tmp_path / f"error{rank}.txt").read_text()
