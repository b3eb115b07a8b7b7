"""DDP and FSDP2 on 2 CPU ranks (gloo): the same parameters as one process on the global batch.

Ranks that differ in their groups, or in the forward/backward passes of a group, all raise
``GroupMismatchError`` instead of dying in DDP's own collectives; the in-process tests at the end
look at the per-pass checks on one rank.
"""

from __future__ import annotations

import gc
import json
import pickle

import pytest
import torch
import torch.distributed as dist

from balancer import Balancer
from balancer.integrations._agreement import RankAgreement
from balancer.integrations.torch_distributed import ReplicatedBackend

STEPS = 3
GROUPS = {"small": 0.1, "mid": 1.0, "large": 30.0}  # gradient scales differ by 300x

RANK_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
from balancer import Balancer, CaptureError, GroupMismatchError

out, mode = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


class Scale(torch.nn.Module):  # a buffer: DDP broadcasts it in every forward
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return x * self.scale


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
if mode == "abandon_buffers":
    model.append(Scale())
if mode == "fsdp":
    from torch.distributed.fsdp import fully_shard
    fully_shard(model[0]); fully_shard(model)
else:
    model = torch.nn.parallel.DistributedDataParallel(model)
opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=["task_norm"])
groups = json.loads(sys.argv[3])
mse = torch.nn.functional.mse_loss

def batch(step, name):
    gen = torch.Generator().manual_seed(1000 * step + sorted(groups).index(name))
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * groups[name]
    half = slice(rank * 4, rank * 4 + 4)
    return x[half], y[half]

def part(x, y, lo, hi):  # this micro-batch's share of the mean over the rank's 4 rows
    return mse(model(x[lo:hi]), y[lo:hi]) * (hi - lo) / 4

def mixed_step(step):
    # several backward passes per group, no_sync on all but the last, opt.backward on a shared graph
    x, y = batch(step, "small")
    with opt.group("small"):
        with model.no_sync():
            part(x, y, 0, 1).backward()
            part(x, y, 1, 2).backward()
        part(x, y, 2, 4).backward()
    (xm, ym), (xl, yl) = batch(step, "mid"), batch(step, "large")
    with model.no_sync():
        shared = model(torch.cat([xm[:2], xl[:2]]))
        opt.backward({"mid": mse(shared[:2], ym[:2]) / 2, "large": mse(shared[2:], yl[:2]) / 2})
    for name, x, y in (("mid", xm, ym), ("large", xl, yl)):
        with opt.group(name):
            part(x, y, 2, 4).backward()

def group_step(step, name):
    x, y = batch(step, name)
    odd = step == 1  # the step in which one rank does something the other does not
    if mode in ("no_sync", "all_no_sync", "extra_no_sync"):
        # two micro-batches: the first one (or, wrongly, both) without DDP's all-reduce
        with model.no_sync():
            part(x, y, 0, 2).backward()
            if mode == "extra_no_sync" and odd and rank == 0 and name == "mid":
                part(x, y, 0, 2).backward()
        if mode == "all_no_sync":
            with model.no_sync():
                part(x, y, 2, 4).backward()
        else:
            part(x, y, 2, 4).backward()
        return
    if mode.startswith("abandon") and odd and rank == 1 and name == "large":
        if mode == "abandon":
            model(x)  # the forward ran, the backward never will
        raise ValueError("a bad micro-batch")
    mse(model(x), y).backward()
    extra = {"extra_backward_0": (0, "small"), "extra_backward_1": (1, "mid")}.get(mode)
    if extra == (step, name) and rank == 0:
        mse(model(x), y).backward()  # one micro-batch more than the other rank

try:
    for step in range(STEPS):
        if mode == "mixed":
            mixed_step(step)
        else:
            names = list(groups)
            if mode == "mismatch" and rank == 1:
                names = names[:1]  # rank 1 skips groups: every rank must raise, none may hang
            for name in names:
                try:
                    with opt.group(name):
                        group_step(step, name)
                except ValueError:
                    pass  # the user skips the micro-batch and goes on
            if mode == "extra_ungrouped" and step == 1 and rank == 0:
                x, y = batch(step, "small")
                mse(model(x), y).backward()
        opt.step()
        opt.zero_grad()
except (GroupMismatchError, CaptureError) as exc:
    (out / f"error{rank}.txt").write_text(str(exc))
    # Leave at once: every rank raised the same error, and tearing down DDP's reducer and gloo
    # after an aborted step can abort the process in C++ destructors ("terminate called...").
    os._exit(0)
params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
torch.save([p.detach().clone() for p in params], out / f"params{rank}.pt")
(out / f"weights{rank}.json").write_text(json.dumps(opt.last_stats.weights.tolist()))
(out / f"backend{rank}.txt").write_text(type(opt.backend).__name__)
# Leave without tearing down gloo and DDP's reducer: about one run in 50 aborts in those C++
# destructors ("terminate called without an active exception") after everything above was written.
os._exit(0)
""".replace("STEPS", str(STEPS))


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


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "no_sync", "mixed"])
def test_two_ranks_match_one_process_on_the_global_batch(mode, launch, tmp_path):
    launch(RANK_SCRIPT, mode, json.dumps(GROUPS))
    expected, weights = _reference()
    backend = "ShardedBackend" if mode == "fsdp" else "ReplicatedBackend"
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


DONE = "'small' 1, 'mid' 1"  # the backward passes both ranks ran in step 1 before they parted
PASS_MISMATCHES = {
    # rank 0's extra micro-batch in step 1: its backward pass meets rank 1's next check
    "extra_backward_1": (
        "rank 0: backward 1 of group 'mid' (synchronized by DDP)",
        f"rank 1: enter group 'large' (backward passes this step: {DONE})",
    ),
    # DDP rebuilds its buckets in its second forward: that forward, rank 0's extra one, is checked first
    "extra_backward_0": (
        "rank 0: forward 1 of group 'small'",
        "rank 1: enter group 'mid' (backward passes this step: 'small' 1)",
    ),
    # the same number of passes on both ranks, but rank 0's second one does not synchronize
    "extra_no_sync": (
        "rank 0: backward 1 of group 'mid' (not synchronized, as under no_sync())",
        "rank 1: backward 1 of group 'mid' (synchronized by DDP)",
    ),
    # rank 1 leaves group 'large' after its forward, before its backward, and goes on to step()
    "abandon": (
        "rank 0: backward 0 of group 'large' (synchronized by DDP)",
        f"rank 1: step() with groups ['small', 'mid', 'large'] (backward passes this step: {DONE})",
    ),
    # the same before the forward, with a buffer that DDP broadcasts in every forward
    "abandon_buffers": (
        "rank 0: forward 0 of group 'large'",
        f"rank 1: step() with groups ['small', 'mid', 'large'] (backward passes this step: {DONE})",
    ),
    "extra_ungrouped": (
        "rank 0: backward 0 outside any group (synchronized by DDP)",
        f"rank 1: step() with groups ['small', 'mid', 'large'] (backward passes this step: {DONE}, 'large' 1)",
    ),
}


@pytest.mark.parametrize("mode", sorted(PASS_MISMATCHES))
def test_ranks_with_different_passes_in_a_group_all_raise(mode, launch, tmp_path):
    launch(RANK_SCRIPT, mode, json.dumps(GROUPS), timeout=60)
    for rank in range(2):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert message.startswith("Data-parallel ranks disagree on the groups of this step:\n"), message
        for line in PASS_MISMATCHES[mode]:
            assert f"\n  {line}\n" in message, message


def test_a_group_never_synchronized_is_refused_on_every_rank(launch, tmp_path):
    launch(RANK_SCRIPT, "all_no_sync", json.dumps(GROUPS), timeout=120)
    for rank in range(2):
        assert "differ across data-parallel ranks" in (tmp_path / f"error{rank}.txt").read_text()


# -- one rank in this process: which events are checked ------------------------------------------
@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Runs the test in a 1-rank gloo group; yields the list of events checked, in order."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    seen: list[str] = []
    check = RankAgreement.check
    monkeypatch.setattr(RankAgreement, "check", lambda self, event: (seen.append(event), check(self, event))[1])
    try:
        yield seen
    finally:
        dist.destroy_process_group()


def _ddp_balancer() -> tuple[torch.nn.Module, Balancer]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, Balancer(inner, backend=ReplicatedBackend(inner))


def test_each_backward_pass_is_checked_once_with_its_group_index_and_synchronization(events):
    model, opt = _ddp_balancer()
    x = torch.randn(4, 6)
    for _ in range(2):  # the second step runs after DDP rebuilt its buckets: no forward is checked
        events.clear()
        with opt.group("a"):
            with model.no_sync():
                model(x).sum().backward()
            model(x).sum().backward()
        out = model(x)
        opt.backward({"b": out[:, 0].sum(), "c": out[:, 1].sum()})  # a shared graph: DDP reduces it once
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        assert [e for e in events if not e.startswith("forward")] == [
            "enter group 'a' (no backward pass this step)",
            "backward 0 of group 'a' (not synchronized, as under no_sync())",
            "backward 1 of group 'a' (synchronized by DDP)",
            "enter group 'b' (backward passes this step: 'a' 2)",
            "backward 0 of group 'b' (synchronized by DDP)",
            "enter group 'c' (backward passes this step: 'a' 2, 'b' 1)",
            "backward 0 of group 'c' (not synchronized, as under no_sync())",
            "backward 0 outside any group (synchronized by DDP)",
            "step() with groups ['a', 'b', 'c'] (backward passes this step: 'a' 2, 'b' 1, 'c' 1, ungrouped 1)",
        ]
    assert not [e for e in events if e.startswith("forward")]  # a model without buffers, buckets rebuilt


def test_a_collected_balancer_checks_nothing(events):
    model, opt = _ddp_balancer()
    with opt.group("a"):
        model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert events
    del opt
    gc.collect()
    events.clear()
    with model.no_sync():
        model(torch.randn(4, 6)).sum().backward()
    assert events == []


def test_a_pickled_copy_checks_its_own_passes(events):
    model, opt = _ddp_balancer()
    copy = pickle.loads(pickle.dumps((model, opt)))
    del model, opt
    gc.collect()
    model, opt = copy
    with opt.group("a"):
        model(torch.randn(4, 6)).sum().backward()
    assert "backward 0 of group 'a' (synchronized by DDP)" in events


def test_one_process_checks_nothing(events):
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 3))
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))  # world size 1: the local backend
    with opt.group("a"):
        model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert type(opt.backend).__name__ == "LocalBackend"
    assert events == []
