"""rlw (Lin et al. 2022): softmax of seeded normal samples; equal to LibMTL 1.1.5 and torchjd 0.18
given the same samples; reproducible per (seed, step, group name); a real model's update."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import RLW
from balancer.plugins import rlw as rlw_module
from balancer.plugins._seeded import group_normals, stable_seed

F64 = torch.float64
CPU = torch.device("cpu")


def _weights(names, step=0, **options):
    k = len(names)
    stats = GroupStats.from_gram(torch.eye(k, dtype=F64), names, step=step)
    return RLW(**options).update(stats, torch.ones(k, dtype=F64), {})[0]


def test_weights_are_the_softmax_of_per_name_generator_draws():
    names = ("math", "code", "chat")
    expected = []
    for name in names:
        gen = torch.Generator().manual_seed(stable_seed("rlw", 7, 3, name))
        expected.append(torch.randn(1, generator=gen, dtype=F64))
    torch.testing.assert_close(_weights(names, step=3, seed=7), torch.softmax(torch.cat(expected), 0))
    torch.testing.assert_close(_weights(names, step=3, seed=7, std=0.5), torch.softmax(0.5 * torch.cat(expected), 0))


def test_reproducible_and_varying():
    names = ("a", "b", "c", "d")
    first = _weights(names, step=5)
    assert torch.equal(first, _weights(names, step=5))
    assert not torch.equal(first, _weights(names, step=6))
    assert not torch.equal(first, _weights(names, step=5, seed=1))
    torch.testing.assert_close(_weights(names[::-1], step=5), first.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(first.sum(), torch.tensor(1.0, dtype=F64))


def test_samples_are_standard_normal():
    draws = torch.cat([group_normals(("a", "b", "c", "d"), 0, t, "rlw", CPU) for t in range(2000)])
    assert abs(draws.mean()) < 0.05 and abs(draws.std() - 1) < 0.05
    weights = torch.stack([_weights(("a", "b", "c"), step=t) for t in range(2000)])
    torch.testing.assert_close(weights.mean(0), torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=0.02)


@pytest.mark.anchors
def test_equals_libmtl_given_the_same_samples(libmtl, monkeypatch):
    """LibMTL draws from ``torch.distributions.Normal`` on the global RNG; we hand both the same ε."""
    samples = torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=F64)
    method = libmtl.RLW()
    method.task_num, method.device = 4, CPU
    method.distribution = type("Fixed", (), {"sample": staticmethod(lambda: samples)})()
    expected = method.backward(torch.ones(4, dtype=F64, requires_grad=True), dist="Normal")
    monkeypatch.setattr(rlw_module, "group_normals", lambda *args: samples)
    torch.testing.assert_close(_weights(("a", "b", "c", "d")), torch.as_tensor(expected, dtype=F64), rtol=1e-5, atol=0)


@pytest.mark.anchors
def test_equals_torchjd_given_the_same_samples(torchjd_aggregation, monkeypatch):
    """torchjd's Random draws ``torch.randn(k)`` on the global RNG: seed it and draw the same."""
    grads = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.manual_seed(11)
    expected = torchjd_aggregation.Random()(grads)
    torch.manual_seed(11)
    samples = torch.randn(3, dtype=F64)
    monkeypatch.setattr(rlw_module, "group_normals", lambda *args: samples)
    direction = _weights(("a", "b", "c")) @ grads
    assert (direction - expected).norm() <= 1e-5 * expected.norm() + 1e-13 * grads.norm(dim=1).max()


def test_incoming_weights_are_multiplied():
    incoming = torch.tensor([2.0, 0.0, -1.0], dtype=F64)
    stats = GroupStats.from_gram(torch.eye(3, dtype=F64), ("a", "b", "c"))
    w, _ = RLW().update(stats, incoming, {})
    torch.testing.assert_close(w, incoming * _weights(("a", "b", "c")))


def test_real_model_update_and_resume(group_gradients):
    def run(resume_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        xs = [torch.randn(6, 5, dtype=F64) for _ in range(3)]
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("rlw", {"seed": 4})])
        params = list(model.parameters())
        for step in range(4):
            if step == resume_at:
                saved = opt.state_dict()
                opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("rlw", {"seed": 4})])
                opt.load_state_dict(saved)
            losses = {f"t{i}": model(x).pow(2).mean() * (i + 1) for i, x in enumerate(xs)}
            grads = group_gradients(losses.values(), params)
            before = torch.cat([p.detach().reshape(-1) for p in params])
            opt.backward(losses)
            opt.step()
            opt.zero_grad()
            expected = _weights(("t0", "t1", "t2"), step=step, seed=4)
            torch.testing.assert_close(opt.last_stats.weights, expected, rtol=0, atol=0)
            after = torch.cat([p.detach().reshape(-1) for p in params])
            # θ - lr·d is rounded at eps·|θ| and a coordinate of d may cancel: the floor follows both scales.
            torch.testing.assert_close(
                before - after,
                0.1 * expected @ grads,
                rtol=1e-10,
                atol=1e-14 * (before.abs().max() + 0.1 * grads.norm(dim=1).max()).item(),
            )
        return after

    straight = run()
    torch.testing.assert_close(run(resume_at=2), straight, rtol=1e-12, atol=1e-14 * straight.abs().max().item())
