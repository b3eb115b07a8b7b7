"""cagrad (Liu et al. 2021): the max-min problem on explicit vectors, torchjd 0.18, LibMTL 1.1.5, a real model."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, ConfigError
from balancer.plugins import CAGrad
from tests.plugins.anchors import cagrad_direction as _reference  # float64 SLSQP on the explicit rows

f64 = torch.float64


def _cases():
    gen = torch.Generator().manual_seed(6)
    g, h = torch.randn(2, 7, generator=gen, dtype=f64)
    yield "random", torch.randn(5, 9, generator=gen, dtype=f64)
    yield "random k=2", torch.randn(2, 9, generator=gen, dtype=f64)
    yield "rank-deficient", torch.randn(5, 2, generator=gen, dtype=f64) @ torch.randn(2, 7, generator=gen, dtype=f64)
    yield "collinear", torch.stack([g, 3 * g, 0.1 * g])
    yield "zero row", torch.stack([g, torch.zeros_like(g), h])
    yield "conflicting", torch.stack([g, -0.5 * g + 0.1 * h, h])


@pytest.mark.parametrize(("name", "a"), list(_cases()), ids=[n for n, _ in _cases()])
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_direction_solves_the_max_min_problem(name, a, c, direction):
    w, d = direction(CAGrad(c=c, rescale=0), a)
    assert torch.isfinite(w).all()
    ref = _reference(a, c)
    torch.testing.assert_close(d, ref, rtol=1e-6, atol=1e-7 * a.norm(dim=1).max())
    g0 = a.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9) + 1e-12 * a.norm(dim=1).max()
    assert (a @ d).min() >= (a @ ref).min() - 1e-9 * a.norm() ** 2


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1.25), (2, 1.5)])
def test_rescale_and_single_group(rescale, divisor, direction):
    g = torch.tensor([[3.0, -1.0, 2.0]], dtype=f64)
    _, d = direction(CAGrad(c=0.5, rescale=rescale), g)
    torch.testing.assert_close(d, 1.5 * g[0] / divisor)


def test_pareto_stationary_cases_are_finite(direction):
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=f64)
    w, d = direction(CAGrad(), opposite)
    assert torch.isfinite(w).all() and d.norm() < 1e-12 * opposite.norm(dim=1).max()  # g0 = 0: the ball is a point
    # 0 in the hull but g0 ≠ 0 and a large ball: ‖g_w‖ = 0 at the optimum (torchjd returns 0 here).
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.05]], dtype=f64)
    w, d = direction(CAGrad(c=5.0, rescale=0), a)
    assert torch.isfinite(w).all()
    scale = a.norm(dim=1).max()
    assert (a @ d).min() >= -1e-9 * scale**2
    assert (d - a.mean(0)).norm() <= 5.0 * a.mean(0).norm() * (1 + 1e-9) + 1e-12 * scale


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(6))
def test_equals_torchjd(torchjd_aggregation, seed, direction):
    """torchjd solves the dual with cvxpy/Clarabel at its default tolerance: measured up to 1e-4 relative
    from the SLSQP reference, which this plugin matches to 1e-8; so the bound here is 3e-4. torchjd has
    no rescale (rescale=0)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2 + seed, 12, generator=gen, dtype=f64)
    _, d = direction(CAGrad(c=0.5, rescale=0), a)
    ref = torchjd_aggregation.CAGrad(c=0.5)(a)
    assert (d - ref).norm() <= 3e-4 * ref.norm() + 1e-12 * a.norm(dim=1).max()
    assert (d - _reference(a)).norm() <= (ref - _reference(a)).norm() + 1e-7 * ref.norm()


def _libmtl_direction(libmtl, a, c, rescale):
    """LibMTL's CAGrad.backward on a prepared gradient matrix: its model hooks are replaced by stubs."""
    cagrad = libmtl.CAGrad()
    cagrad.rep_grad, cagrad.task_num, cagrad.device = False, a.shape[0], torch.device("cpu")
    out = []
    cagrad._compute_grad_dim = lambda: None
    cagrad._compute_grad = lambda losses, mode: a.clone()
    cagrad._reset_grad = out.append
    cagrad.backward([None] * a.shape[0], calpha=c, rescale=rescale)
    return out[0]


@pytest.mark.anchors
@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_equals_libmtl(libmtl, seed, rescale, direction):
    """LibMTL 1.1.5 (3 groups only) runs SLSQP at its default tolerance (ftol 1e-6) with +1e-8 terms and
    float32 weights: measured 4e-9 to 2.3e-4 relative, while this plugin is within 1.5e-8 of the
    tight-tolerance reference. So: 1e-5 where LibMTL's SLSQP converged, and never farther from the reference."""
    a = torch.randn(3, 10, generator=torch.Generator().manual_seed(seed), dtype=f64)
    _, d = direction(CAGrad(c=0.5, rescale=rescale), a)
    ref = _libmtl_direction(libmtl, a, 0.5, rescale)
    exact = _reference(a) / {0: 1.0, 1: 1.25, 2: 1.5}[rescale]
    floor = 1e-12 * a.norm(dim=1).max()  # rounding level of the gradients, for a direction that cancels
    assert (d - exact).norm() <= 1e-7 * exact.norm() + floor
    assert (d - ref).norm() <= max(1e-5 * ref.norm(), (ref - exact).norm() * (1 + 1e-3)) + floor
    assert (d - ref).norm() <= 3e-4 * ref.norm() + floor


@pytest.mark.anchors
def test_libmtl_fails_with_four_groups_here_it_works(libmtl, direction):
    a = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=f64)
    with pytest.raises(ValueError, match="reshape"):
        _libmtl_direction(libmtl, a, 0.5, 1)
    _, d = direction(CAGrad(), a)
    torch.testing.assert_close(d, _reference(a) / 1.25, rtol=1e-6, atol=1e-8 * a.norm(dim=1).max())


def test_incoming_weights_compose(direction):
    a = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    v = torch.tensor([2.0, 0.5, 1.5], dtype=f64)
    _, d = direction(CAGrad(rescale=0), a, incoming=v)
    torch.testing.assert_close(d, _reference(v[:, None] * a), rtol=1e-6, atol=1e-8 * (v[:, None] * a).norm(dim=1).max())


def test_real_model_update_is_lr_times_direction(real_model_step):
    update, grads = real_model_step([("cagrad", {"c": 0.4})], 0.05)
    ref = _reference(grads, 0.4) / (1 + 0.4**2)
    torch.testing.assert_close(update, 0.05 * ref, rtol=1e-6, atol=1e-9 * grads.norm().item())


def test_rescale_with_c_zero_is_refused_as_ignored(model):
    """With c = 0 the ball is a point: 1, 1 + c² and 1 + c are all 1, so rescale could not matter."""
    with pytest.raises(ConfigError, match=r"plugins\.0\.options.*rescale=2 would be ignored with c=0.*Set c > 0"):
        Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("cagrad", {"c": 0.0, "rescale": 2})])
    CAGrad(c=0.0)  # the mean gradient, with the default rescale
