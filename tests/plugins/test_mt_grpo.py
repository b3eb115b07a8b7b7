"""mt_grpo (Ramesh et al. 2026, MT-GRPO): the logit update against a float64 transcription of the
method (torch.optim.Adam on the logits, autograd through the softmax), step by step on adversarial
sequences; the weights; the report channel through a Balancer; the state across a weights_only load.
No anchor library implements MT-GRPO, so there is no anchor comparison."""

from __future__ import annotations

import io

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import MTGRPO
from balancer.plugins.mt_grpo import MTGRPOOptions, observe_state
from balancer.recipes.split_half import SplitHalf

F64 = torch.float64


class _Reference:
    """The method written out: J_k ← β J_k + (1-β) r_k; δ = clip(I, ±c) + λ J; one optimizer step on
    the logits ξ with the gradient of softmax(ξ)ᵀδ (autograd) and weight decay γ."""

    def __init__(self, names, lr=0.025, gamma=1e-5, reward_weight=0.2, reward_decay=0.5, clip=0.1, sgd=False):
        self.names = list(names)
        self.xi = torch.zeros(len(names), dtype=F64, requires_grad=True)
        make = torch.optim.SGD if sgd else torch.optim.Adam
        self.opt = make([self.xi], lr=lr, weight_decay=gamma)
        self.j = torch.zeros(len(names), dtype=F64)
        self.lam, self.beta, self.clip = reward_weight, reward_decay, clip

    def rewards(self, values):
        for name, r in values.items():
            i = self.names.index(name)
            self.j[i] = self.beta * self.j[i] + (1 - self.beta) * r

    def improvements(self, values):
        gains = torch.tensor([values.get(n, 0.0) for n in self.names], dtype=F64)
        delta = torch.clamp(gains, -self.clip, self.clip) + self.lam * self.j
        self.opt.zero_grad()
        (grad,) = torch.autograd.grad(torch.softmax(self.xi, 0), self.xi, grad_outputs=delta)
        self.xi.grad = grad
        self.opt.step()

    def z(self):
        return torch.softmax(self.xi.detach(), 0)


def _sequence(names, steps, seed):
    """Rewards in [0, 1] and improvements of both signs, some beyond the clip, one task that never improves."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        r = torch.rand(len(names), generator=gen, dtype=F64)
        gains = (torch.rand(len(names), generator=gen, dtype=F64) - 0.4) * 0.5  # in [-0.2, 0.3]: clipped often
        gains[-1] = 0.0  # a task with no improvement at all
        out.append(
            (
                {n: float(v) for n, v in zip(names, r, strict=True)},
                {n: float(v) for n, v in zip(names, gains, strict=True)},
            )
        )
    return out


def _close(actual, expected, rtol=1e-12):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))


OPTION_SETS = [
    {},
    {"lr": 0.3, "gamma": 0.0, "reward_weight": 1.0, "improvement_clip": 0.05},
    {"reward_decay": 0.0, "improvement_clip": 10.0},
    {"optimizer": "sgd", "lr": 0.5, "gamma": 0.01},
]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_logits_follow_the_transcription_step_by_step(options, k):
    names = [f"t{i}" for i in range(k)]
    opts = MTGRPOOptions(**options)
    ref = _Reference(
        names,
        lr=opts.lr,
        gamma=opts.gamma,
        reward_weight=opts.reward_weight,
        reward_decay=opts.reward_decay,
        clip=opts.improvement_clip,
        sgd=opts.optimizer == "sgd",
    )
    state = MTGRPO(options).init()
    state = observe_state(state, opts, rewards=dict.fromkeys(names, 0.0))  # every task known from the start
    for rewards, gains in _sequence(names, 12, seed=k):
        state = observe_state(state, opts, rewards=rewards)
        ref.rewards(rewards)
        state = observe_state(state, opts, improvements=gains)
        ref.improvements(gains)
        _close(state["reward"], ref.j)
        _close(state["logits"], ref.xi.detach())
        _close(torch.softmax(state["logits"], 0), ref.z())
    if k == 1:
        assert state["logits"].abs().max() < 1e-3  # a lone task: δ - zᵀδ = 0, only the decay acts


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_task_with_the_lowest_reward_and_no_improvement_gains_weight(optimizer):
    opts = MTGRPOOptions(optimizer=optimizer, lr=0.025 if optimizer == "adam" else 5.0)
    state = observe_state(MTGRPO().init(), opts, rewards={"easy": 0.9, "mid": 0.5, "hard": 0.05})
    for _ in range(20):
        state = observe_state(state, opts, improvements={"easy": 0.05, "mid": 0.05, "hard": 0.0})
    z = torch.softmax(state["logits"], 0)
    assert z[2] > 0.5 and z[2] > z[1] and z[2] > z[0]
    if optimizer == "sgd":  # Adam moves every logit at about lr per step whatever the size of its gradient
        assert z[1] > z[0]


def test_negative_improvements_and_partial_reports():
    """A task whose loss rose (I < 0) gains weight; a task left out of a report keeps J and counts I = 0."""
    opts = MTGRPOOptions(reward_weight=0.0)
    ref = _Reference(["a", "b", "c"], reward_weight=0.0)
    state = observe_state(MTGRPO().init(), opts, rewards={"a": 0.5, "b": 0.5, "c": 0.5})
    ref.rewards({"a": 0.5, "b": 0.5, "c": 0.5})
    for gains in [{"a": -0.3, "b": 0.02}, {"a": -0.01, "b": -0.02, "c": 0.5}, {"b": 0.0}]:
        state = observe_state(state, opts, rewards={"b": 1.0})
        ref.rewards({"b": 1.0})
        state = observe_state(state, opts, improvements=gains)
        ref.improvements(gains)
    _close(state["logits"], ref.xi.detach())
    _close(state["reward"], ref.j)
    assert state["reward"][0] == 0.25 and state["reward"][2] == 0.25  # only their first report


def test_new_tasks_start_at_zero_and_are_appended():
    opts = MTGRPOOptions()
    state = observe_state(MTGRPO().init(), opts, rewards={"a": 1.0}, improvements={"a": 0.1})
    assert state["names"] == ["a"]
    state = observe_state(state, opts, improvements={"b": 0.05})
    assert state["names"] == ["a", "b"] and state["reward"][1] == 0.0 and state["steps"].tolist() == [2.0, 1.0]


@pytest.mark.parametrize("apply", ["weights", "sampling"])
def test_weights_are_k_times_the_ratios_of_the_present_tasks(apply):
    plugin = MTGRPO(apply=apply)
    state = observe_state(plugin.init(), plugin.options, rewards={"a": 0.9, "b": 0.1, "c": 0.4})
    for _ in range(5):
        state = observe_state(state, plugin.options, improvements={"a": 0.1, "b": 0.0, "c": -0.1})
    z = dict(zip(state["names"], torch.softmax(state["logits"], 0), strict=True))
    stats = GroupStats.from_gram(torch.eye(2, dtype=F64), ["c", "a"])
    incoming = torch.tensor([2.0, 0.5], dtype=F64)
    weights, new_state = plugin.update(stats, incoming, state)
    if apply == "sampling":
        expected = incoming
    else:
        expected = incoming * 2 * torch.stack([z["c"], z["a"]]) / (z["c"] + z["a"])
    _close(weights, expected)
    assert new_state["names"] == ["a", "b", "c"]
    _, added = plugin.update(GroupStats.from_gram(torch.eye(1, dtype=F64), ["d"]), torch.ones(1, dtype=F64), state)
    assert added["names"] == ["a", "b", "c", "d"] and added["logits"][3] == 0.0


def _model_step(opt, model, groups):
    x = torch.randn(4, 3, dtype=F64)
    opt.backward({g: model(x).square().mean() * (i + 1) for i, g in enumerate(groups)})
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("nested", [False, True])
def test_observe_through_a_balancer_and_the_state_survives_a_weights_only_load(nested):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    plugins = [SplitHalf(["mt_grpo"])] if nested else ["mt_grpo"]
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.01), plugins=plugins)
    ref = _Reference(["math", "code"])
    for rewards, gains in _sequence(["math", "code"], 4, seed=7):
        MTGRPO.observe(opt, rewards=rewards)
        ref.rewards(rewards)
        _model_step(opt, model, ["math", "code"])
        MTGRPO.observe(opt, improvements=gains)
        ref.improvements(gains)
    z = MTGRPO.probabilities(opt)
    _close(torch.stack([z["math"], z["code"]]), ref.z())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh_model = torch.nn.Linear(3, 1).double()
    fresh_model.load_state_dict(model.state_dict())
    fresh = Balancer(torch.optim.SGD(fresh_model.parameters(), lr=0.01), plugins=plugins)
    fresh.load_state_dict(loaded)
    for target in (opt, fresh):
        MTGRPO.observe(target, rewards={"math": 0.3, "code": 0.8}, improvements={"math": -0.05, "code": 0.2})
    a, b = MTGRPO.probabilities(opt), MTGRPO.probabilities(fresh)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_observe_without_the_plugin_names_the_fix():
    opt = Balancer(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), plugins=["famo"])
    with pytest.raises(ValueError, match="no mt_grpo plugin"):
        MTGRPO.observe(opt, rewards={"a": 1.0})
