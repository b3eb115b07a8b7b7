"""stch (Lin et al. 2024): the factors are the gradient of ``μ log Σ exp(λ_i (L_i − z*_i)/μ)`` with respect
to the losses, against autograd of torchjd 0.18's ``STCH`` scalarizer in float64."""

from __future__ import annotations

import pytest
import torch

from balancer.errors import PluginError
from balancer.plugins import STCH
from tests.plugins.test_cosmos import _balancer_and_scalarized_updates, _close, _gradient, _weights

F64 = torch.float64


def _plugin(mu: float, r: torch.Tensor, z: torch.Tensor | None = None) -> STCH:
    reference = 0.0 if z is None else {f"g{i}": float(x) for i, x in enumerate(z)}
    return STCH(mu=mu, preference={f"g{i}": float(x) for i, x in enumerate(r)}, reference=reference)


def _paper(mu: float, r: torch.Tensor, z: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda v: mu * torch.logsumexp(r * (v - z) / mu, dim=0)


@pytest.mark.anchors
@pytest.mark.parametrize("mu", [1e-3, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_factors_are_the_gradient_of_torchjds_stch(scalarization, k: int, mu: float) -> None:
    gen = torch.Generator().manual_seed(k)
    for with_reference in (False, True):
        losses = torch.rand(k, generator=gen, dtype=F64) * 3 + 0.01
        r = torch.rand(k, generator=gen, dtype=F64) + 0.05
        r = r / r.sum()
        z = losses * torch.rand(k, generator=gen, dtype=F64) if with_reference else None
        w, state = _weights(_plugin(mu, r, z), losses)
        _close(w, _gradient(scalarization.STCH(mu, r, z), losses))
        assert state["undefined"].item() == 0.0


ADVERSARIAL = {
    "equal losses": [0.7, 0.7, 0.7],
    "a zero loss": [0.0, 1.5, 0.3],
    "very different sizes": [1e-6, 1.0, 1e6],
    "tiny and huge": [1e-12, 3e-3, 5e8, 2.0],
    "huge ties": [1e300, 1e300],
    "k = 1": [2.5],
}


@pytest.mark.anchors
@pytest.mark.parametrize("mu", [1e-3, 1.0])
@pytest.mark.parametrize("losses", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_losses_equal_torchjd(scalarization, losses, mu: float) -> None:  # type: ignore[no-untyped-def]
    k = len(losses)
    for r in (None, torch.arange(1, k + 1, dtype=F64)):
        plugin = STCH(mu=mu) if r is None else _plugin(mu, r)
        w, state = _weights(plugin, losses)
        _close(w, _gradient(scalarization.STCH(mu, r), losses))
        assert state["undefined"].item() == 0.0


def test_tiny_mu_does_not_overflow_and_picks_the_weighted_maximum() -> None:
    r = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    w, state = _weights(_plugin(1e-300, r), [1.0, 2.0, 2.4])  # λ(L - z) = 0.5, 0.6, 0.48
    torch.testing.assert_close(w, torch.tensor([0.0, 0.3, 0.0], dtype=F64), rtol=0, atol=0)
    assert state["undefined"].item() == 0.0


def test_large_mu_tends_to_the_linear_scalarization() -> None:
    r = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    losses = torch.tensor([1.0, 2.0, 2.4], dtype=F64)
    w, _ = _weights(_plugin(1e6, r), losses)
    torch.testing.assert_close(w, r / 3, rtol=1e-6, atol=0)
    w, _ = _weights(_plugin(0.7, r), losses)
    _close(w, _gradient(_paper(0.7, r, torch.zeros(3, dtype=F64)), losses))
    assert not torch.allclose(w, r / 3, rtol=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_unknown_or_infinite_loss_falls_back_to_the_large_mu_limit_and_says_so(bad: float) -> None:
    r = torch.tensor([0.2, 0.8, 0.0], dtype=F64)
    plugin = _plugin(0.1, r)
    w, state = _weights(plugin, [0.5, bad, 2.0])
    torch.testing.assert_close(w, r / 3, rtol=0, atol=0)
    assert plugin.metrics(state)["undefined"].item() == 1.0


def test_preference_and_reference_are_keyed_by_name() -> None:
    plugin = STCH(mu=0.5, preference={"a": 0.6, "b": 0.1}, default=0.3, reference={"c": 1.0})
    losses = torch.tensor([0.8, 4.0, 1.9], dtype=F64)
    w, _ = _weights(plugin, losses, ["a", "b", "c"])
    r, z = torch.tensor([0.6, 0.1, 0.3], dtype=F64), torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    _close(w, _gradient(_paper(0.5, r, z), losses))
    permuted, _ = _weights(plugin, losses[[1, 2, 0]], ["b", "c", "a"])
    _close(permuted, w[[1, 2, 0]])
    with pytest.raises(PluginError, match=r"no preference for groups \['d'\]"):
        _weights(STCH(preference={"a": 1.0}), [1.0, 2.0], ["a", "d"])


@pytest.mark.anchors
def test_balancer_step_equals_backward_of_torchjds_scalarized_loss(scalarization) -> None:  # type: ignore[no-untyped-def]
    order = ["g0", "g2", "g1"]
    # losses near 1, 1e2 and 1e4: preferences that bring λ_i L_i within a few μ of each other
    preference, reference = {"g0": 1.0, "g1": 0.01, "g2": 1e-4}, {"g1": 10.0}
    plugins = [("stch", {"mu": 0.5, "preference": preference, "reference": reference})]
    r = torch.tensor([preference[n] for n in order], dtype=F64)
    z = torch.tensor([reference.get(n, 0.0) for n in order], dtype=F64)
    _close(*_balancer_and_scalarized_updates(plugins, scalarization.STCH(0.5, r, z), order), rtol=1e-10)
