"""Tap plugins under DDP on 2 CPU ranks (gloo): tap statistics are summed over ranks at step time.

replay_bias (GSA): rank 0 taps 3-class logits, rank 1 5-class logits, so the per-class vectors
have different lengths locally; after each step both ranks hold the state and parameters of one
process that tapped both halves of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from balancer import Balancer
from balancer.plugins import ReplayBias

STEPS = 4
OPTIONS = {"warmup": 1, "include_current": False}
COLUMNS = (3, 5)  # rank r taps logits[:, :COLUMNS[r]] with labels in [COLUMNS[r] - 3, COLUMNS[r])

RANK_SCRIPT = f"""
import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
from pathlib import Path
from balancer import Balancer

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 5).double())
opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.5), plugins=[("replay_bias", {OPTIONS})])
columns = {COLUMNS}[rank]
for step in range({STEPS}):
    gen = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(columns - 3, columns, (4,), generator=gen)
    logits = opt.tap(model(x)[:, :columns], group=["replay", "current"] * 2, labels=y)
    (F.cross_entropy(logits, y, reduction="sum") / 8 * 2).backward()  # DDP averages over the 2 ranks
    opt.step()
    opt.zero_grad()
torch.save(
    {{"state": dict(opt.plugin_states["replay_bias"]), "params": [p.detach() for p in model.parameters()]}},
    out / f"rank{{rank}}.pt",
)
dist.barrier()
os._exit(0)  # skip gloo's C++ teardown, which about one run in 50 aborts after all is written
"""


def _reference():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.5), plugins=[("replay_bias", OPTIONS)])
    for step in range(STEPS):
        loss = 0.0
        for rank, columns in enumerate(COLUMNS):
            gen = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
            y = torch.randint(columns - 3, columns, (4,), generator=gen)
            logits = opt.tap(model(x)[:, :columns], group=["replay", "current"] * 2, labels=y)
            loss = loss + F.cross_entropy(logits, y, reduction="sum") / 8
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt.plugin_states["replay_bias"], [p.detach() for p in model.parameters()]


def test_replay_bias_state_is_summed_over_ranks_with_different_classes(launch, tmp_path):
    launch(RANK_SCRIPT)
    state, params = _reference()
    assert state["count"].shape == (5,) and (state["count"] > 0).all()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got["state"]) == set(state)
        for key, value in state.items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-12, atol=1e-12, msg=f"rank {rank} {key}")
        for a, b in zip(got["params"], params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    weight = ReplayBias(OPTIONS).metrics(state)["weight"]
    assert not torch.allclose(weight, torch.ones_like(weight))  # the weights did act after the warm-up
