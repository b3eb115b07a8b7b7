"""pbi (Zhang & Li 2007): the factors are the gradient of ``d₁ + θ d₂`` with respect to the losses, against
autograd of torchjd 0.18's ``PBI`` scalarizer in float64, and where the paper's ``|d₁|`` differs."""

from __future__ import annotations

import pytest
import torch

from balancer.plugins import PBI
from tests.plugins.test_cosmos import _balancer_and_scalarized_updates, _close, _gradient, _weights

F64 = torch.float64


def _plugin(theta: float, r: torch.Tensor, z: torch.Tensor | None = None) -> PBI:
    reference = 0.0 if z is None else {f"g{i}": float(x) for i, x in enumerate(z)}
    return PBI(theta=theta, preference={f"g{i}": float(x) for i, x in enumerate(r)}, reference=reference)


def _paper(theta: float, r: torch.Tensor, z: torch.Tensor, signed: bool):  # type: ignore[no-untyped-def]
    """The paper's ``d₁ + θ d₂`` (``d₁ = |fᵀŵ|`` unless ``signed``), with torchjd's smoothing of d₂."""

    def scalarize(v: torch.Tensor) -> torch.Tensor:
        unit = r / r.norm()
        d1 = (v - z) @ unit
        p = v - z - d1 * unit
        return (d1 if signed else d1.abs()) + theta * torch.sqrt(p @ p + 1e-12)

    return scalarize


@pytest.mark.anchors
@pytest.mark.parametrize("theta", [0.0, 1.0, 5.0, 20.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_factors_are_the_gradient_of_torchjds_pbi(scalarization, k: int, theta: float) -> None:
    gen = torch.Generator().manual_seed(10 * k + int(theta))
    for with_reference in (False, True):
        losses = torch.rand(k, generator=gen, dtype=F64) * 3 + 0.01
        r = torch.rand(k, generator=gen, dtype=F64) + 0.05
        z = losses * torch.rand(k, generator=gen, dtype=F64) if with_reference else None
        w, state = _weights(_plugin(theta, r, z), losses)
        _close(w, _gradient(scalarization.PBI(theta, r, z), losses))
        assert state["undefined"].item() == 0.0


ADVERSARIAL = {
    "a zero loss": [0.0, 1.5, 0.3],
    "very different sizes": [1e-6, 1.0, 1e6],
    "tiny and huge": [1e-12, 3e-3, 5e8, 2.0],
    "tiny": [1e-200, 3e-200],
    "below the reference": [-0.5, -1.0, -2.0],
    "k = 1": [2.5],
}


@pytest.mark.anchors
@pytest.mark.parametrize("losses", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_losses_equal_torchjd(scalarization, losses) -> None:  # type: ignore[no-untyped-def]
    k = len(losses)
    for r in (torch.full((k,), 1.0 / k, dtype=F64), torch.arange(1, k + 1, dtype=F64)):
        w, state = _weights(_plugin(5.0, r), losses)
        _close(w, _gradient(scalarization.PBI(5.0, r), losses), rtol=1e-11)
        assert state["undefined"].item() == 0.0


@pytest.mark.anchors
@pytest.mark.parametrize("size", [1e-3, 1.0, 1e3])
def test_on_the_preference_line_equals_torchjd_to_rounding(scalarization, size: float) -> None:
    """Equal losses with a uniform preference: p is rounding noise (about 1e-16·size), which the
    smoothing keeps at about θ·1e-16·size/sqrt(eps) in the factors, here as in torchjd."""
    losses = torch.full((4,), size, dtype=F64)
    r = torch.full((4,), 0.25, dtype=F64)
    w, _ = _weights(_plugin(5.0, r), losses)
    noise = 5.0 * 1e-15 * size / 1e-6
    torch.testing.assert_close(w, _gradient(scalarization.PBI(5.0, r), losses), rtol=0, atol=noise)
    torch.testing.assert_close(w, torch.full((4,), 0.5, dtype=F64), rtol=0, atol=noise)  # ŵ


def test_the_paper_d1_agrees_above_the_ideal_point_and_is_signed_below_it() -> None:
    r = torch.tensor([0.3, 0.7, 1.0], dtype=F64)
    z = torch.tensor([0.1, 0.0, 0.2], dtype=F64)
    unit = r / r.norm()
    above = torch.tensor([0.9, 1.4, 0.4], dtype=F64)
    w, _ = _weights(_plugin(5.0, r, z), above)
    _close(w, _gradient(_paper(5.0, r, z, signed=False), above))
    below = torch.tensor([-0.9, -1.4, 0.0], dtype=F64)  # fᵀŵ < 0
    w, _ = _weights(_plugin(5.0, r, z), below)
    _close(w, _gradient(_paper(5.0, r, z, signed=True), below))
    _close(w - _gradient(_paper(5.0, r, z, signed=False), below), 2 * unit)  # |d₁| would climb back to z*


def test_finite_and_exact_where_the_squared_norm_overflows() -> None:
    r = torch.tensor([0.6, 0.1, 0.3], dtype=F64)
    unit_losses = torch.tensor([1.0, 3.0, 0.5], dtype=F64)
    w, state = _weights(_plugin(2.0, r), unit_losses * 1e200)
    # at these sizes eps is negligible: a = ŵ + θ p/‖p‖, scale-free
    expected = _gradient(_paper(2.0, r, torch.zeros(3, dtype=F64), signed=True), unit_losses)
    assert state["undefined"].item() == 0.0
    _close(w, expected, rtol=1e-10)
    w, _ = _weights(_plugin(2.0, torch.ones(1, dtype=F64)), [1e300])  # k = 1 at the top of the range
    torch.testing.assert_close(w, torch.ones(1, dtype=F64), rtol=0, atol=0)


def test_eps_smooths_the_kink() -> None:
    r = torch.tensor([1.0, 1.0], dtype=F64)
    losses = torch.tensor([1.0, 1.0 + 1e-7], dtype=F64)  # ‖p‖ ≈ 7e-8, below sqrt(1e-12) = 1e-6
    sharp, _ = _weights(PBI(theta=1.0, preference={"g0": 1.0, "g1": 1.0}, eps=1e-30), losses)
    smooth, _ = _weights(PBI(theta=1.0, preference={"g0": 1.0, "g1": 1.0}), losses)
    unit = r / r.norm()
    perpendicular = torch.tensor([-1.0, 1.0], dtype=F64) / 2**0.5
    _close(sharp, unit + perpendicular, rtol=1e-8)  # p/‖p‖
    _close(smooth, unit + perpendicular * 0.0707 / (1 + 0.0707**2) ** 0.5, rtol=1e-3)  # ‖p‖/sqrt(‖p‖² + eps)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_unknown_or_infinite_loss_falls_back_to_the_preference_direction_and_says_so(bad: float) -> None:
    r = torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    plugin = _plugin(5.0, r)
    w, state = _weights(plugin, [0.5, bad, 2.0])
    torch.testing.assert_close(w, r / 5.0, rtol=0, atol=0)
    assert plugin.metrics(state)["undefined"].item() == 1.0


def test_reference_is_keyed_by_name_with_zero_for_others() -> None:
    plugin = PBI(theta=2.0, preference={"a": 1.0, "b": 2.0, "c": 0.5}, reference={"b": 0.3})
    losses = torch.tensor([0.8, 1.1, 0.6], dtype=F64)
    w, _ = _weights(plugin, losses, ["a", "b", "c"])
    z = torch.tensor([0.0, 0.3, 0.0], dtype=F64)
    _close(w, _gradient(_paper(2.0, torch.tensor([1.0, 2.0, 0.5], dtype=F64), z, signed=True), losses))
    permuted, _ = _weights(plugin, losses[[2, 0, 1]], ["c", "a", "b"])
    _close(permuted, w[[2, 0, 1]])


@pytest.mark.anchors
def test_balancer_step_equals_backward_of_torchjds_scalarized_loss(scalarization) -> None:  # type: ignore[no-untyped-def]
    order = ["g1", "g2", "g0"]
    preference, reference = {"g0": 1.0, "g1": 0.1, "g2": 0.01}, {"g0": 0.5, "g2": 10.0}
    plugins = [("pbi", {"theta": 5.0, "preference": preference, "reference": reference})]
    r = torch.tensor([preference[n] for n in order], dtype=F64)
    z = torch.tensor([reference.get(n, 0.0) for n in order], dtype=F64)
    _close(*_balancer_and_scalarized_updates(plugins, scalarization.PBI(5.0, r, z), order), rtol=1e-10)
