"""famo (Liu et al. 2023): weights and logits against a hand computation with torch.optim.Adam,
against torchjd 0.18's FAMO scalarizer fed the next step's losses, and on a real model."""

from __future__ import annotations

import io

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import FAMO

F64 = torch.float64


def _stats(losses, names=None, step=0):
    k = len(losses)
    return GroupStats.from_gram(torch.eye(k, dtype=F64), names, losses=torch.tensor(losses, dtype=F64), step=step)


class _HandFAMO:
    """The paper's update written out, with torch.optim.Adam (or plain SGD) on the logits."""

    def __init__(self, k, lr=0.025, gamma=1e-3, min_loss=0.0, eps=1e-8, optimizer="adam"):
        self.xi = torch.zeros(k, dtype=F64, requires_grad=True)
        self.opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([self.xi], lr=lr, weight_decay=gamma)
        self.bound, self.eps, self.previous = min_loss, eps, None

    def weights(self, losses):
        shifted = torch.tensor(losses, dtype=F64) - self.bound + self.eps
        if self.previous is not None:
            delta = self.previous.log() - shifted.log()
            z = torch.softmax(self.xi, 0)
            (grad,) = torch.autograd.grad(z, self.xi, grad_outputs=delta)
            self.xi.grad = grad
            self.opt.step()
        self.previous = shifted
        z = torch.softmax(self.xi.detach(), 0)
        return (z / shifted) / (z / shifted).sum()


def _losses_sequence(k, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(k, generator=gen, dtype=F64) * 3 + 0.5
    rates = torch.rand(k, generator=gen, dtype=F64) * 0.2
    return [
        (start * (1 - rates) ** t * (1 + 0.05 * torch.rand(k, generator=gen, dtype=F64))).tolist() for t in range(steps)
    ]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("options", [{}, {"lr": 0.3, "gamma": 0.0}, {"min_loss": 0.2, "gamma": 0.01}])
def test_matches_a_hand_computation_over_steps(options, optimizer):
    sequence = _losses_sequence(3, 12)
    plugin = FAMO(optimizer=optimizer, **options)
    hand = _HandFAMO(3, optimizer=optimizer, **options)
    state = plugin.init()
    for t, losses in enumerate(sequence):
        w, state = plugin.update(_stats(losses, step=t), torch.ones(3, dtype=F64), state)
        torch.testing.assert_close(w, hand.weights(losses), rtol=1e-10, atol=0)
    xi = hand.xi.detach()  # a logit may sit near 0: the floor is relative to the largest
    torch.testing.assert_close(state["logits"], xi, rtol=1e-10, atol=1e-10 * xi.abs().max().item())


@pytest.mark.anchors
@pytest.mark.parametrize("k", [2, 4])
def test_equals_torchjd_scalarizer_fed_the_next_losses(torchjd_aggregation, k):
    """torchjd's FAMO weights step t with its logits, then ``update`` learns from the losses it is
    given: feeding it step t+1's losses is this plugin's schedule. Its coefficients on the losses
    are the gradient of the scalarized loss."""
    from torchjd.scalarization import FAMO as TorchjdFAMO

    scalarizer = TorchjdFAMO(k, lr=0.025, weight_decay=1e-3).double()
    plugin, state = FAMO(), FAMO().init()
    sequence = _losses_sequence(k, 10, seed=k)
    for t, losses in enumerate(sequence):
        values = torch.tensor(losses, dtype=F64, requires_grad=True)
        (expected,) = torch.autograd.grad(scalarizer(values), values)
        w, state = plugin.update(_stats(losses, step=t), torch.ones(k, dtype=F64), state)
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=0)
        if t + 1 < len(sequence):
            scalarizer.update(torch.tensor(sequence[t + 1], dtype=F64))


def test_weights_combine_log_losses_equally_at_start():
    """With ξ = 0 the factors are ℓ̃_i⁻¹ / Σ ℓ̃_j⁻¹: the update is the gradient of mean log loss, rescaled."""
    w, _ = FAMO().update(_stats([1.0, 4.0]), torch.ones(2, dtype=F64), FAMO().init())
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=F64), rtol=1e-7, atol=0)


def test_missing_losses_fall_back_to_softmax_logits_and_keep_history():
    plugin = FAMO(lr=0.5)
    w0, state = plugin.update(_stats([2.0, 1.0]), torch.ones(2, dtype=F64), plugin.init())
    w1, state = plugin.update(_stats([1.0, 1.0], step=1), torch.ones(2, dtype=F64), state)  # logits learn
    missing, after = plugin.update(_stats([float("nan"), 0.5], step=2), torch.ones(2, dtype=F64), state)
    assert torch.isfinite(missing).all()
    # group 0 has no δ (δ_0 = 0), group 1 has one: logits still learn; the factors are z
    torch.testing.assert_close(missing, torch.softmax(after["logits"], 0))
    assert not torch.equal(after["logits"], state["logits"])
    assert after["log_loss"][0] == state["log_loss"][0]  # kept for the next δ
    nothing, frozen = plugin.update(
        _stats([float("nan")] * 2, step=3),
        torch.ones(2, dtype=F64),
        {**after, "log_loss": after["log_loss"] * torch.nan},
    )
    torch.testing.assert_close(frozen["logits"], after["logits"])  # no δ at all: no step, no Adam count
    torch.testing.assert_close(frozen["steps"], after["steps"])
    torch.testing.assert_close(nothing, torch.softmax(after["logits"], 0))


def test_losses_at_or_below_min_loss_are_not_used():
    w, state = FAMO(min_loss=1.0).update(_stats([0.5, 2.0]), torch.ones(2, dtype=F64), FAMO().init())
    assert torch.isfinite(w).all() and w.tolist() == [0.5, 0.5]
    assert torch.isnan(state["log_loss"][0])


def test_min_loss_per_group_name():
    plugin = FAMO(min_loss={"b": 1.0})
    w, _ = plugin.update(_stats([2.0, 2.0], names=("a", "b")), torch.ones(2, dtype=F64), plugin.init())
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3], dtype=F64), rtol=1e-7, atol=0)


def test_new_group_starts_at_zero_logit_and_absent_group_is_frozen():
    plugin = FAMO(lr=0.5)
    state = plugin.init()
    for t, losses in enumerate([[3.0, 1.0], [1.0, 0.9], [0.5, 0.8]]):
        _, state = plugin.update(_stats(losses, ("a", "b"), step=t), torch.ones(2, dtype=F64), state)
    saved_a = state["logits"][0].clone()
    _, state = plugin.update(_stats([0.7, 2.0], ("b", "c"), step=3), torch.ones(2, dtype=F64), state)
    assert state["names"] == ["a", "b", "c"]
    assert state["logits"][0] == saved_a and state["steps"][0] == 2.0
    assert state["steps"][2] == 1.0  # c took part in the logit step (through the softmax)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    data = [(torch.randn(6, 5, dtype=F64), torch.randn(6, 2, dtype=F64) * s) for s in (1.0, 5.0, 0.2)]
    return model, data


def _losses(model, data):
    return {f"t{i}": (model(x) - y).pow(2).mean() for i, (x, y) in enumerate(data)}


def test_real_model_weights_follow_the_recorded_losses(group_gradients):
    model, data = _model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=[("famo", {"lr": 0.2})])
    hand = _HandFAMO(3, lr=0.2)
    params = list(model.parameters())
    for _ in range(6):
        losses = _losses(model, data)
        grads = group_gradients(losses.values(), params)
        expected = hand.weights([v.item() for v in losses.values()])
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(opt.last_stats.weights, expected, rtol=1e-10, atol=0)
        after = torch.cat([p.detach().reshape(-1) for p in params])
        # θ - lr·d is rounded at eps·|θ| and a coordinate of d may cancel: the floor follows both scales.
        torch.testing.assert_close(
            before - after,
            0.05 * expected @ grads,
            rtol=1e-10,
            atol=1e-14 * (before.abs().max() + 0.05 * grads.norm(dim=1).max()).item(),
        )


def test_state_round_trip_through_state_dict():
    def run(resume_at):
        model, data = _model()
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=["famo"])
        for step in range(6):
            if step == resume_at:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=["famo"])
                opt.load_state_dict(torch.load(buffer, weights_only=True))
            opt.backward(_losses(model, data))
            opt.step()
            opt.zero_grad()
        return opt.last_stats.weights, opt.plugin_states["famo"]

    (w_a, s_a), (w_b, s_b) = run(None), run(3)
    torch.testing.assert_close(w_b, w_a, rtol=1e-12, atol=0)
    for key in ("logits", "log_loss", "exp_avg", "exp_avg_sq", "steps"):
        torch.testing.assert_close(s_b[key], s_a[key], rtol=1e-12, atol=1e-12 * s_a[key].abs().max().item())
