"""task_norm with estimate="split_half": the unbiased split-half norm per task, against float64 references."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats, PluginError
from balancer.plugins import TaskNorm
from balancer.recipes.split_half import half_groups


def _halves_model_step(group_gradients, scales):
    """One SGD(lr=0) step of a float64 model with each task captured as two halves; the halves' gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.0), plugins=[("task_norm", {"estimate": "split_half"})])
    losses = {}
    for t, scale in enumerate(scales):
        for name in half_groups(f"t{t}"):
            x = torch.randn(5, 4, dtype=torch.float64) + t
            losses[name] = model(x).sum() * scale
    grads = group_gradients(losses.values(), model.parameters())
    opt.backward(losses)
    opt.step()
    return opt, grads


def test_weights_come_from_the_split_half_estimate_on_a_real_model(group_gradients):
    opt, grads = _halves_model_step(group_gradients, [1.0, 30.0, 0.05])

    estimates = torch.stack([(4.0 * grads[2 * t] @ grads[2 * t + 1]).clamp_min(0).sqrt() for t in range(3)])
    assert (estimates > 0).all()
    factors = estimates.mean() / estimates
    torch.testing.assert_close(opt.last_stats.weights, factors.repeat_interleave(2), rtol=1e-12, atol=0)
    # the weighted tasks have equal split-half estimates: the target, the mean of the estimates
    weighted = [(4.0 * (factors[t] * grads[2 * t]) @ (factors[t] * grads[2 * t + 1])).sqrt() for t in range(3)]
    torch.testing.assert_close(torch.stack(weighted), estimates.mean().expand(3), rtol=1e-12, atol=0)


def _halves_stats(cross, own=4.0):
    """Stats of 2 tasks x 2 halves: ‖g‖² = own for every half, ⟨g_A, g_B⟩ = cross[t], tasks orthogonal."""
    gram = torch.zeros(4, 4, dtype=torch.float64)
    for t, c in enumerate(cross):
        gram[2 * t : 2 * t + 2, 2 * t : 2 * t + 2] = torch.tensor([[own, c], [c, own]], dtype=torch.float64)
    return GroupStats.from_gram(gram, [*half_groups("a"), *half_groups("b")])


def test_naive_and_split_half_disagree_when_one_task_is_mostly_noise():
    stats = _halves_stats([3.0, 0.25])  # same naive norms, but b's halves barely agree
    ones = torch.ones(4, dtype=torch.float64)

    naive, _ = TaskNorm().update(stats, ones, TaskNorm().init())
    split, _ = TaskNorm(estimate="split_half").update(stats, ones, TaskNorm().init())

    torch.testing.assert_close(naive, ones)
    est = torch.tensor([12.0, 1.0], dtype=torch.float64).sqrt()
    torch.testing.assert_close(split, (est.mean() / est).repeat_interleave(2), rtol=1e-12, atol=0)


def test_a_task_whose_halves_disagree_gets_weight_zero():
    stats = _halves_stats([3.0, -0.5])
    w, _ = TaskNorm(estimate="split_half").update(stats, torch.ones(4, dtype=torch.float64), TaskNorm().init())
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_ema_is_kept_per_task():
    plugin = TaskNorm(estimate="split_half", beta=0.5)
    ones = torch.ones(4, dtype=torch.float64)
    _, state = plugin.update(_halves_stats([1.0, 4.0]), ones, plugin.init())
    w, state = plugin.update(_halves_stats([9.0, 4.0]), ones, state)

    assert set(state["ema_norms"]) == {"a", "b"}
    ema = torch.tensor([0.5 * 2.0 + 0.5 * 6.0, 4.0], dtype=torch.float64)  # sqrt(4·1)=2, sqrt(4·9)=6, sqrt(16)=4
    torch.testing.assert_close(torch.stack([state["ema_norms"]["a"], state["ema_norms"]["b"]]), ema)
    torch.testing.assert_close(w, (ema.mean() / ema).repeat_interleave(2))


def test_a_group_without_its_other_half_is_refused():
    gram = torch.eye(3, dtype=torch.float64)
    stats = GroupStats.from_gram(gram, [*half_groups("a"), "b"])
    with pytest.raises(PluginError, match=r"without their other half: \['b'\]"):
        TaskNorm(estimate="split_half").update(stats, torch.ones(3, dtype=torch.float64), TaskNorm().init())
