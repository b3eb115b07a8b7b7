"""uncertainty (Kendall, Gal, Cipolla 2018): learned log-variances against a float64 reference with
torch.optim.Adam on the paper's objective, against LibMTL 1.1.5's UW, and its state by name."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import Uncertainty

F64 = torch.float64


def _stats(losses: list[float], names: tuple[str, ...] | None = None) -> GroupStats:
    k = len(losses)
    return GroupStats.from_gram(torch.eye(k, dtype=F64), names, losses=torch.tensor(losses, dtype=F64))


def _sequence(k: int = 3, steps: int = 12, seed: int = 0) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, k, generator=gen, dtype=F64) * 3 + 0.05).tolist()


def _run(plugin: Uncertainty, sequence: list[list[float]]) -> list[torch.Tensor]:
    state, out = plugin.init(), []
    for losses in sequence:
        w, state = plugin.update(_stats(losses), torch.ones(len(losses), dtype=F64), state)
        out.append(w)
    return out


def _reference(sequence: list[list[float]], lr: float, init: float, rule: str) -> list[torch.Tensor]:
    """The paper's objective Σ L_i / (2 exp(s_i)) + s_i / 2 with s a torch Parameter stepped by torch.optim;
    the weights of a step are ∂objective/∂L_i before s's step."""
    s = torch.nn.Parameter(torch.full((len(sequence[0]),), init, dtype=F64))
    opt = torch.optim.Adam([s], lr=lr) if rule == "adam" else torch.optim.SGD([s], lr=lr)
    out = []
    for losses in sequence:
        values = torch.tensor(losses, dtype=F64, requires_grad=True)
        objective = (values / (2 * s.exp()) + s / 2).sum()
        opt.zero_grad()
        objective.backward()
        out.append(values.grad.clone())
        opt.step()
    return out


@pytest.mark.parametrize(("rule", "lr", "init"), [("adam", 1e-4, -0.5), ("adam", 0.05, 0.3), ("sgd", 0.2, -0.5)])
def test_equals_torch_optim_on_the_papers_objective(rule: str, lr: float, init: float) -> None:
    sequence = _sequence()
    got = _run(Uncertainty(lr=lr, init=init, optimizer=rule), sequence)
    for w, expected in zip(got, _reference(sequence, lr, init, rule), strict=True):
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(got[0], got[-1])  # the log-variances moved


def test_variance_converges_to_the_loss() -> None:
    """∂L/∂s = 1/2 - L/(2σ²) vanishes at σ² = L: with constant losses the weights tend to 1/(2L)."""
    losses = [0.5, 2.0, 8.0]
    weights = _run(Uncertainty(lr=0.05), [losses] * 600)
    torch.testing.assert_close(weights[-1], 1 / (2 * torch.tensor(losses, dtype=F64)), rtol=1e-3, atol=0)


@pytest.mark.anchors
def test_equals_libmtl_uw_with_adam(libmtl) -> None:  # type: ignore[no-untyped-def]
    """LibMTL's UW keeps s in the model's optimizer: with Adam at the same lr the weights agree every step."""
    sequence = _sequence(k=4, steps=10, seed=1)
    method = libmtl.UW()
    method.task_num, method.device = 4, torch.device("cpu")
    method.init_param()
    opt = torch.optim.Adam([method.loss_scale], lr=1e-3)
    got = _run(Uncertainty(lr=1e-3), sequence)
    for losses, w in zip(sequence, got, strict=True):
        opt.zero_grad()
        expected = method.backward(torch.tensor(losses, dtype=torch.float32, requires_grad=True))
        opt.step()
        torch.testing.assert_close(w, torch.as_tensor(expected, dtype=F64), rtol=1e-5, atol=0)


def test_missing_losses_keep_the_log_variance_and_names_follow() -> None:
    plugin = Uncertainty(lr=0.1, optimizer="sgd")
    _, state = plugin.update(_stats([1.0, 3.0], ("a", "b")), torch.ones(2, dtype=F64), plugin.init())
    before = dict(zip(state["names"], state["scalar"].tolist(), strict=True))
    w, state = plugin.update(_stats([float("nan"), 2.0], ("a", "b")), torch.ones(2, dtype=F64), state)
    after = dict(zip(state["names"], state["scalar"].tolist(), strict=True))
    assert after["a"] == before["a"] and after["b"] != before["b"]
    assert w[0].item() == pytest.approx(0.5 * torch.exp(torch.tensor(-before["a"])).item())
    # a new group starts at init; the order of the step's names does not matter
    w, state = plugin.update(_stats([1.0, 1.0], ("c", "b")), torch.ones(2, dtype=F64), state)
    assert state["names"] == ["a", "b", "c"]
    assert w[0].item() == pytest.approx(0.5 * torch.exp(torch.tensor(0.5)).item())  # init -0.5


def test_in_a_balancer_weights_the_losses_and_survives_a_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def make(model: torch.nn.Module) -> Balancer:
        return Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("uncertainty", {"lr": 0.1})])

    def step(opt: Balancer, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        opt.backward({"small": out[:, 0].pow(2).mean() * 0.1, "large": out[:, 1].pow(2).mean() * 10})
        opt.step()
        opt.zero_grad()
        return opt.last_stats.weights.clone()

    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 2), torch.randn(8, 3)
    opt = make(model)
    for _ in range(3):
        weights = step(opt, model, x)
    assert weights[0] > weights[1]  # the group with the larger loss gets the smaller weight
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    expected = step(opt, model, x)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(saved["model"])
    fresh = make(copy)
    fresh.load_state_dict(saved["opt"])
    assert torch.equal(step(fresh, copy, x), expected)  # the log-variances came back with the checkpoint
    unloaded = torch.nn.Linear(3, 2)
    unloaded.load_state_dict(saved["model"])
    assert not torch.equal(step(make(unloaded), unloaded, x), expected)  # without the state: other weights
