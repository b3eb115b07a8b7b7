"""cosmos (Ruchte & Grabocka 2021): the factors are the gradient of ``rᵀL − λ cos(r, L)`` with respect to
the losses, against autograd of torchjd 0.18's ``COSMOS`` scalarizer in float64 and of the paper's
formula where torchjd's ``cosine_similarity`` clamps ``‖L‖``."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.errors import PluginError
from balancer.plugins import COSMOS
from tests.conftest import group_loss, make_batches, make_model

F64 = torch.float64


def _weights(plugin: COSMOS, losses, names=None):  # type: ignore[no-untyped-def]
    losses = torch.as_tensor(losses, dtype=F64)
    k = losses.numel()
    names = names or [f"g{i}" for i in range(k)]
    stats = GroupStats.from_gram(torch.eye(k, dtype=F64), names, losses=losses)
    return plugin.update(stats, torch.ones(k, dtype=F64), plugin.init())


def _gradient(scalarizer, losses) -> torch.Tensor:  # type: ignore[no-untyped-def]
    values = torch.as_tensor(losses, dtype=F64).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(scalarizer(values), values)
    return grad


def _paper(lambda_: float, r: torch.Tensor):  # type: ignore[no-untyped-def]
    """The paper's objective, written out (no clamping)."""
    return lambda v: (r * v).sum() - lambda_ * (r * v).sum() / (r.norm() * v.norm())


def _plugin(lambda_: float, r: torch.Tensor) -> COSMOS:
    return COSMOS(lambda_=lambda_, preference={f"g{i}": float(x) for i, x in enumerate(r)})


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.anchors
@pytest.mark.parametrize("lambda_", [0.0, 0.5, 2.0, 8.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_factors_are_the_gradient_of_torchjds_cosmos(scalarization, k: int, lambda_: float) -> None:
    gen = torch.Generator().manual_seed(10 * k + int(lambda_))
    for _ in range(5):
        losses = torch.rand(k, generator=gen, dtype=F64) * 3 + 0.01
        r = torch.rand(k, generator=gen, dtype=F64) + 0.05
        r = r / r.sum()  # on the simplex, as the paper's Dirichlet samples
        w, state = _weights(_plugin(lambda_, r), losses)
        _close(w, _gradient(scalarization.COSMOS(lambda_, r), losses))
        assert state["undefined"].item() == 0.0


ADVERSARIAL = {
    "equal losses": [0.7, 0.7, 0.7],
    "a zero loss": [0.0, 1.5, 0.3],
    "very different sizes": [1e-6, 1.0, 1e6],
    "tiny and huge": [1e-12, 3e-3, 5e8, 2.0],
    "negative loss": [-0.5, 1.0, 2.0],
    "k = 1": [2.5],
}


@pytest.mark.anchors
@pytest.mark.parametrize("losses", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_losses_equal_torchjd(scalarization, losses) -> None:  # type: ignore[no-untyped-def]
    k = len(losses)
    for r in (torch.full((k,), 1.0 / k, dtype=F64), torch.arange(1, k + 1, dtype=F64)):
        w, state = _weights(_plugin(2.0, r), losses)
        _close(w, _gradient(scalarization.COSMOS(2.0, r), losses), rtol=1e-11)
        assert state["undefined"].item() == 0.0


def test_the_penalty_part_is_orthogonal_to_the_losses() -> None:
    losses = torch.tensor([0.4, 2.0, 1.1], dtype=F64)
    r = torch.tensor([0.5, 0.2, 0.3], dtype=F64)
    w, _ = _weights(_plugin(3.0, r), losses)
    _close(w, _gradient(_paper(3.0, r), losses))
    torch.testing.assert_close((w - r) @ losses, torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.anchors
def test_below_torchs_norm_clamp_follows_the_formula_not_torchjd(scalarization) -> None:  # type: ignore[no-untyped-def]
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=F64) * 1e-10  # ‖L‖ < 1e-8: cosine_similarity clamps it
    r = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    w, _ = _weights(_plugin(0.5, r), losses)
    _close(w, _gradient(_paper(0.5, r), losses))
    assert not torch.allclose(_gradient(scalarization.COSMOS(0.5, r), losses), w, rtol=1e-2)


def test_finite_and_exact_where_the_squared_norm_overflows_or_underflows() -> None:
    r = torch.tensor([0.6, 0.1, 0.3], dtype=F64)
    for scale in (1e200, 1e-200):
        unit = torch.tensor([1.0, 3.0, 0.5], dtype=F64)
        w, state = _weights(_plugin(1.5, r), unit * scale)
        # cos(r, L) is scale-free: its gradient at s·l is (1/s) times its gradient at l
        cos_grad = _gradient(lambda v: (r * v).sum() / (r.norm() * v.norm()), unit)
        assert torch.isfinite(w).all() and state["undefined"].item() == 0.0
        if scale > 1:
            _close(w, r - 1.5 * cos_grad / scale)
        else:  # the factors are 1e200 times the unit gradient: compare after scaling back
            _close((w - r) * scale, -1.5 * cos_grad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_unknown_or_infinite_loss_falls_back_to_the_preference_and_says_so(bad: float) -> None:
    r = torch.tensor([0.2, 0.8, 0.0], dtype=F64)
    plugin = _plugin(1.0, r)
    w, state = _weights(plugin, [0.5, bad, 2.0])
    torch.testing.assert_close(w, r, rtol=0, atol=0)
    assert plugin.metrics(state)["undefined"].item() == 1.0


def test_every_loss_zero_is_undefined_unless_lambda_is_zero() -> None:
    r = torch.tensor([0.25, 0.75], dtype=F64)
    w, state = _weights(_plugin(1.0, r), [0.0, 0.0])
    torch.testing.assert_close(w, r, rtol=0, atol=0)
    assert state["undefined"].item() == 1.0
    w, state = _weights(_plugin(0.0, r), [0.0, 0.0])
    torch.testing.assert_close(w, r, rtol=0, atol=0)
    assert state["undefined"].item() == 0.0


def test_default_preference_is_uniform_and_keyed_by_name() -> None:
    losses = [0.3, 1.7, 0.9]
    uniform, _ = _weights(COSMOS(lambda_=1.0), losses)
    _close(uniform, _gradient(_paper(1.0, torch.full((3,), 1 / 3, dtype=F64)), losses))
    plugin = COSMOS(lambda_=1.0, preference={"a": 0.5, "b": 0.2}, default=0.3)
    forward, _ = _weights(plugin, losses, ["a", "b", "c"])
    backward, _ = _weights(plugin, losses[::-1], ["c", "b", "a"])
    _close(backward, forward.flip(0))
    _close(forward, _gradient(_paper(1.0, torch.tensor([0.5, 0.2, 0.3], dtype=F64)), losses))


def test_missing_preference_and_an_all_zero_step_are_errors() -> None:
    with pytest.raises(PluginError, match=r"no preference for groups \['c'\]"):
        _weights(COSMOS(preference={"a": 0.5, "b": 0.5}), [1.0, 2.0, 3.0], ["a", "b", "c"])
    with pytest.raises(PluginError, match=r"every group of this step \(\['b'\]\) has preference 0"):
        _weights(COSMOS(preference={"a": 1.0, "b": 0.0}), [1.0], ["b"])


@pytest.mark.anchors
def test_balancer_step_equals_backward_of_torchjds_scalarized_loss(scalarization) -> None:  # type: ignore[no-untyped-def]
    preference = {"g2": 0.2, "g0": 0.5, "g1": 0.3}
    order = ["g2", "g0", "g1"]  # any order: the preference follows the names

    plugins = [("cosmos", {"lambda_": 1000.0, "preference": preference})]  # losses near 1, 1e2, 1e4
    r = torch.tensor([preference[name] for name in order], dtype=F64)
    _close(*_balancer_and_scalarized_updates(plugins, scalarization.COSMOS(1000.0, r), order), rtol=1e-10)


def _balancer_and_scalarized_updates(plugins, scalarizer, order):  # type: ignore[no-untyped-def]
    """The parameter change of one SGD step through the Balancer (``opt.backward({name: loss})``) and of
    one on ``scalarizer(stacked losses).backward()``, from the same model and batches."""
    batches, updates = make_batches(dtype=F64), []
    for balanced in (True, False):
        model = make_model(dtype=F64)
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        inner = torch.optim.SGD(model.parameters(), lr=0.01)
        losses = {name: group_loss(model, batches[name]) for name in order}
        if balanced:
            opt = Balancer(inner, plugins=plugins)
            opt.backward(losses)
            opt.step()
        else:
            scalarizer(torch.stack(list(losses.values()))).backward()
            inner.step()
        updates.append(before - torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert updates[0].abs().max() > 1e-6  # the step moved the parameters
    return updates
