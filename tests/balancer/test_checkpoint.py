"""Distributed checkpoints: the plugin states survive torch.distributed.checkpoint (one process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from balancer import Balancer, StateDictError
from balancer.checkpoint import BalancerState


def _train(model, opt, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        for i, name in enumerate(("a", "b", "c")):
            x = torch.randn(4, 3, generator=gen)
            with opt.group(name):
                (model(x) * 10.0**i).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _build(model, plugins=(("task_norm", {"beta": 0.5, "target": "ema"}),)):
    return Balancer(torch.optim.Adam(model.parameters(), lr=1e-2), plugins=list(plugins))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = _build(model)
    _train(model, opt, range(2))
    state = {"model": model.state_dict(), "optim": opt.inner.state_dict(), "balancer": BalancerState(opt)}
    dcp.save(state, checkpoint_id=tmp_path / "ckpt")
    _train(model, opt, range(2, 4))
    expected = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    fresh_model = torch.nn.Linear(3, 2)
    fresh = _build(fresh_model)
    _train(fresh_model, fresh, range(1))  # a fresh run with other state: all of it must be replaced
    target = {
        "model": fresh_model.state_dict(),
        "optim": fresh.inner.state_dict(),
        "balancer": BalancerState(fresh),
    }
    dcp.load(target, checkpoint_id=tmp_path / "ckpt")
    fresh_model.load_state_dict(target["model"])
    fresh.inner.load_state_dict(target["optim"])
    assert fresh.balancer_state_dict()["step"] == 2
    assert set(fresh.plugin_states["task_norm"]["ema_norms"]) == {"a", "b", "c"}
    _train(fresh_model, fresh, range(2, 4))
    for got, want in zip(fresh_model.parameters(), expected, strict=True):
        assert torch.equal(got.detach(), want)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_refuses_a_section_for_other_plugins(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = _build(model)
    _train(model, opt, range(1))
    dcp.save({"balancer": BalancerState(opt)}, checkpoint_id=tmp_path / "ckpt")
    other = _build(model, plugins=["pcgrad"])
    with pytest.raises(StateDictError, match="different plugin list"):
        dcp.load({"balancer": BalancerState(other)}, checkpoint_id=tmp_path / "ckpt")
