"""task_norm (Wu et al.): equal per-group contribution norms, checked against float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import Balancer, ConfigError, GroupStats
from balancer.contract.testing import random_stats
from balancer.plugins import TaskNorm


def _norm_stats(norms, names=None, step=0):
    return GroupStats.from_gram(torch.diag(torch.tensor(norms, dtype=torch.float64) ** 2), names, step=step)


def _weights(plugin, norms, state=None, incoming=None):
    stats = _norm_stats(norms)
    ones = torch.ones(len(norms), dtype=torch.float64)
    return plugin.update(stats, ones if incoming is None else incoming, state or plugin.init())


def test_equal_contributions_on_a_real_model_against_float64_reference(group_gradients):
    """Per-group gradients by autograd.grad in float64; after the step, ‖w_k g_k‖ is the mean norm."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.0), plugins=["task_norm"])
    xs = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    scales = [1.0, 33.0, 0.02]
    losses = {f"t{i}": model(x).pow(2).mean() * s for i, (x, s) in enumerate(zip(xs, scales, strict=True))}
    grads = group_gradients(losses.values(), model.parameters())
    opt.backward(losses)
    opt.step()
    norms = torch.stack([g.norm() for g in grads])
    weights = opt.last_stats.weights
    contributions = torch.stack([(w * g).norm() for w, g in zip(weights, grads, strict=True)])
    torch.testing.assert_close(contributions, norms.mean().expand(3), rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.last_stats.norms, norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("target", "expected_target"),
    [("mean", 3.0), ("max", 6.0), ("min", 1.0)],
)
def test_targets(target, expected_target):
    w, _ = _weights(TaskNorm(target=target), [1.0, 2.0, 6.0])
    torch.testing.assert_close(w, expected_target / torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64))


def test_partial_equalization_alpha():
    w, _ = _weights(TaskNorm(alpha=0.5), [1.0, 4.0])
    torch.testing.assert_close(w, torch.tensor([2.5**0.5, (2.5 / 4.0) ** 0.5], dtype=torch.float64))
    w_small, _ = _weights(TaskNorm(alpha=1e-6), [1.0, 4.0])  # alpha → 0: no change (alpha = 0 itself is refused)
    torch.testing.assert_close(w_small, torch.tensor([2.5**1e-6, (2.5 / 4.0) ** 1e-6], dtype=torch.float64))


def test_incoming_weights_are_part_of_the_contribution():
    w, _ = _weights(TaskNorm(), [1.0, 1.0], incoming=torch.tensor([2.0, -1.0], dtype=torch.float64))
    # contributions |v|·‖g‖ = [2, 1], target 1.5: w = v · 1.5/[2, 1]
    torch.testing.assert_close(w, torch.tensor([1.5, -1.5], dtype=torch.float64))


def test_ema_of_norms_over_steps_matches_hand_computation():
    plugin = TaskNorm(beta=0.9)
    state = plugin.init()
    history = [[1.0, 10.0], [2.0, 10.0], [4.0, 5.0]]
    ema = torch.tensor(history[0], dtype=torch.float64)
    for t, norms in enumerate(history):
        if t:
            ema = 0.9 * ema + 0.1 * torch.tensor(norms, dtype=torch.float64)
        w, state = plugin.update(_norm_stats(norms, ["a", "b"]), torch.ones(2, dtype=torch.float64), state)
        torch.testing.assert_close(w, ema.mean() / ema)
    torch.testing.assert_close(state["ema_norms"]["a"], ema[0])


def test_ema_target_smooths_the_mean_norm():
    plugin = TaskNorm(target="ema", target_beta=0.5)
    state = plugin.init()
    _, state = plugin.update(_norm_stats([2.0, 4.0]), torch.ones(2, dtype=torch.float64), state)
    assert state["ema_target"].item() == 3.0
    w, state = plugin.update(_norm_stats([1.0, 1.0]), torch.ones(2, dtype=torch.float64), state)
    assert state["ema_target"].item() == 2.0  # 0.5·3 + 0.5·1
    assert w.tolist() == [2.0, 2.0]


def test_zero_norm_group_gets_weight_zero_not_nan():
    w, _ = _weights(TaskNorm(), [0.0, 2.0, 4.0])
    assert w.tolist() == [0.0, 1.5, 0.75]  # target is the mean over groups with a gradient
    w_all_zero, _ = _weights(TaskNorm(target="min"), [0.0, 0.0])
    assert w_all_zero.tolist() == [0.0, 0.0]


def test_eps_caps_the_weight_of_a_vanishing_group():
    w, _ = _weights(TaskNorm(eps=1e-3), [1e-12, 1.0])
    target = (1e-12 + 1.0) / 2
    torch.testing.assert_close(w[0], torch.tensor(1.0 / 1e-3, dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.tensor(target, dtype=torch.float64))


def test_max_weight_caps_the_factor():
    w, _ = _weights(TaskNorm(max_weight=10.0), [1e-6, 1.0, 3.0])
    target = (1e-6 + 1.0 + 3.0) / 3
    torch.testing.assert_close(w, torch.tensor([10.0, target, target / 3.0], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(
    log_norms=st.lists(st.floats(-12, 12), min_size=1, max_size=8),
    alpha=st.floats(0.0, 1.0, exclude_min=True),
)
def test_contribution_norms_follow_the_formula(log_norms, alpha):
    norms = torch.tensor([10.0**v for v in log_norms], dtype=torch.float64)
    w, _ = _weights(TaskNorm(alpha=alpha, eps=1e-30), norms.tolist())
    target = norms.mean()
    torch.testing.assert_close(w * norms, target**alpha * norms ** (1 - alpha), rtol=1e-9, atol=0)


def test_random_stats_weights_equalize():
    stats = random_stats(4, seed=3)
    w, _ = TaskNorm().update(stats, torch.ones(4, dtype=torch.float64), TaskNorm().init())
    contributions = w * stats.norms
    torch.testing.assert_close(contributions, stats.norms.mean().expand(4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_beta": 0.5}, r"target_beta=0\.5 would be ignored with target='mean'.*Set target='ema'"),
        ({"target": "max", "target_beta": 0.99}, r"target_beta=0\.99 would be ignored with target='max'"),
        ({"alpha": 0.0}, r"alpha=0 makes every factor .* = 1: task_norm would change no weight.*alpha > 0"),
    ],
)
def test_ignored_or_no_op_options_are_refused(options, message, model):
    with pytest.raises(ConfigError, match=rf"plugins\.0\.options.*{message}"):
        Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("task_norm", options)])


def test_options_that_take_effect_are_accepted_and_a_full_dump_validates_again():
    TaskNorm(target="ema", target_beta=0.5)
    for options in ({}, {"target": "ema", "target_beta": 0.5}, {"target": "max", "max_weight": 4.0}):
        dumped = TaskNorm(options).options.model_dump()  # every field, as a BalancerConfig round trip writes them
        assert TaskNorm(dumped).options == TaskNorm(options).options
