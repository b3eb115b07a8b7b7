"""dwa (Liu, Johns, Davison 2019): per-step Dynamic Weight Average against a hand computation,
LibMTL 1.1.5 and torchjd 0.18 (one "epoch" per step), and a real model's recorded losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import DWA

F64 = torch.float64


def _stats(losses, names=None, step=0):
    k = len(losses)
    return GroupStats.from_gram(torch.eye(k, dtype=F64), names, losses=torch.tensor(losses, dtype=F64), step=step)


def _hand(history, temperature=2.0):
    """The paper's rule with steps for epochs: uniform until two past losses exist."""
    if len(history) < 2:
        return [1.0] * len(history[-1] if history else [])
    ratios = [a / b for a, b in zip(history[-1], history[-2], strict=True)]
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


def _sequence(k=3, steps=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, k, generator=gen, dtype=F64) * 2 + 0.1).tolist()


def _run(plugin, sequence, names=None):
    state, out = plugin.init(), []
    for t, losses in enumerate(sequence):
        w, state = plugin.update(_stats(losses, names, step=t), torch.ones(len(losses), dtype=F64), state)
        out.append(w)
    return out, state


@pytest.mark.parametrize("temperature", [2.0, 0.5, 10.0])
def test_matches_the_hand_computation(temperature):
    sequence = _sequence()
    weights, _ = _run(DWA(temperature=temperature), sequence)
    for t, w in enumerate(weights):
        torch.testing.assert_close(w, torch.tensor(_hand(sequence[:t], temperature) or [1.0] * 3, dtype=F64))
        torch.testing.assert_close(w.sum(), torch.tensor(3.0, dtype=F64))


def test_ema_smoothing_matches_the_hand_computation():
    sequence = _sequence(steps=6)
    smoothed, ema = [], None
    for losses in sequence:
        ema = losses if ema is None else [0.8 * e + 0.2 * v for e, v in zip(ema, losses, strict=True)]
        smoothed.append(ema)
    weights, _ = _run(DWA(beta=0.8), sequence)
    for t, w in enumerate(weights):
        torch.testing.assert_close(w, torch.tensor(_hand(smoothed[:t]) or [1.0] * 3, dtype=F64))


def _libmtl_dwa(libmtl, buffer, epoch):
    method = libmtl.DWA()
    method.task_num, method.device, method.epoch = buffer.shape[0], torch.device("cpu"), epoch
    method.train_loss_buffer = buffer
    losses = torch.ones(buffer.shape[0], dtype=F64, requires_grad=True)
    return torch.as_tensor(method.backward(losses, T=2.0), dtype=F64)


@pytest.mark.anchors
def test_equals_libmtl_with_one_epoch_per_step(libmtl):
    """LibMTL's ``train_loss_buffer[:, e]`` holds epoch e's average loss; here step t's loss."""
    sequence = _sequence(k=4, steps=7, seed=1)
    buffer = np.array(sequence).T
    weights, _ = _run(DWA(), sequence)
    for t, w in enumerate(weights):
        torch.testing.assert_close(w, _libmtl_dwa(libmtl, buffer, t), rtol=1e-5, atol=0)


@pytest.mark.anchors
def test_equals_torchjd_with_one_epoch_per_step(torchjd_aggregation):
    from torchjd.scalarization import DWA as TorchjdDWA

    sequence = _sequence(k=3, steps=6, seed=2)
    scalarizer = TorchjdDWA(temperature=2.0)
    weights, _ = _run(DWA(), sequence)
    for t, losses in enumerate(sequence):
        values = torch.tensor(losses, dtype=F64, requires_grad=True)
        (expected,) = torch.autograd.grad(scalarizer(values), values)
        scalarizer.step()
        torch.testing.assert_close(weights[t], expected.to(F64), rtol=1e-5, atol=0)


@pytest.mark.anchors
def test_zero_loss_is_nan_in_libmtl_uniform_here(libmtl):
    sequence = [[0.0, 1.0], [0.5, 0.9], [0.4, 0.8]]
    with np.errstate(divide="ignore"):
        assert not torch.isfinite(_libmtl_dwa(libmtl, np.array(sequence).T, 2)).all()
    weights, _ = _run(DWA(), sequence)
    assert weights[2].tolist() == [1.0, 1.0]  # the ratio 0.5 / 0 is unusable: the first-epochs rule


def test_missing_losses_keep_the_history_and_give_uniform_weights():
    plugin = DWA()
    weights, state = _run(plugin, [[1.0, 2.0], [0.5, 1.9]])
    w, state = plugin.update(_stats([float("nan"), 1.5], step=2), torch.ones(2, dtype=F64), state)
    torch.testing.assert_close(w, torch.tensor(_hand([[1.0, 2.0], [0.5, 1.9]]), dtype=F64))  # past losses only
    assert state["last"].tolist() == [0.5, 1.5] and state["before"].tolist() == [1.0, 1.9]
    w, _ = plugin.update(_stats([0.2, 1.0], step=3), torch.ones(2, dtype=F64), state)
    torch.testing.assert_close(w, torch.tensor(_hand([[1.0, 1.9], [0.5, 1.5]]), dtype=F64))
    fresh, _ = plugin.update(_stats([float("nan")] * 2), torch.ones(2, dtype=F64), plugin.init())
    assert fresh.tolist() == [1.0, 1.0]


def test_history_follows_names_and_new_groups_wait():
    plugin = DWA()
    _, state = _run(plugin, [[1.0, 2.0], [0.5, 1.9]], names=("a", "b"))
    w, state = plugin.update(_stats([1.8, 0.4], ("b", "a"), step=2), torch.ones(2, dtype=F64), state)
    torch.testing.assert_close(w, torch.tensor(_hand([[2.0, 1.0], [1.9, 0.5]]), dtype=F64))
    w, state = plugin.update(_stats([1.0, 3.0], ("a", "c"), step=3), torch.ones(2, dtype=F64), state)
    assert w.tolist() == [1.0, 1.0]  # c has no history yet
    assert state["names"] == ["a", "b", "c"]


def test_real_model_weights_follow_the_recorded_losses(group_gradients):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    data = [(torch.randn(6, 5, dtype=F64), torch.randn(6, 2, dtype=F64) * s) for s in (1.0, 5.0, 0.2)]
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=["dwa"])
    params, recorded = list(model.parameters()), []
    for _ in range(5):
        losses = {f"t{i}": (model(x) - y).pow(2).mean() for i, (x, y) in enumerate(data)}
        grads = group_gradients(losses.values(), params)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        expected = torch.tensor(_hand(recorded) if len(recorded) >= 2 else [1.0] * 3, dtype=F64)
        torch.testing.assert_close(opt.last_stats.weights, expected, rtol=1e-12, atol=0)
        after = torch.cat([p.detach().reshape(-1) for p in params])
        # θ - lr·d is rounded at eps·|θ| and a coordinate of d may cancel: the floor follows both scales.
        torch.testing.assert_close(
            before - after,
            0.05 * expected @ grads,
            rtol=1e-10,
            atol=1e-14 * (before.abs().max() + 0.05 * grads.norm(dim=1).max()).item(),
        )
        recorded.append(opt.last_stats.losses.tolist())
