"""nash_mtl (Navon et al. 2022): G α = 1/α on explicit vectors, torchjd 0.18, state, a real model."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, root

from balancer import Balancer, GroupStats
from balancer.plugins import NashMTL

f64 = torch.float64


def _reference_alpha(a, max_norm=0.0):
    """α > 0 with α_i · g_iᵀ(Σ_j α_j g_j) = 1 for every i, by scipy's root finder on the explicit vectors
    (in the unknowns β_i = α_i ‖g_i‖ on the unit vectors g_i / ‖g_i‖, an exact change of variables)."""
    norms = np.linalg.norm(a.numpy(), axis=1)
    unit = a.numpy() / norms[:, None]
    corr = unit @ unit.T
    # The positive root is the minimiser of ½ βᵀCβ - Σ log β (other roots have negative entries).
    start = minimize(
        lambda b: 0.5 * b @ corr @ b - np.log(b).sum(),
        np.ones(len(norms)),
        jac=lambda b: corr @ b - 1.0 / b,
        bounds=[(1e-9, None)] * len(norms),
        method="L-BFGS-B",
    ).x
    res = root(lambda b: b * (corr @ b) - 1.0, start, tol=1e-14)
    assert (res.x > 0).all() and np.abs(res.x * (corr @ res.x) - 1.0).max() < 1e-11
    alpha = torch.from_numpy(res.x / norms)
    norm = (alpha @ a).norm()
    if max_norm > 0 and norm > max_norm:
        alpha = alpha * max_norm / norm
    return alpha


def _update(plugin, a, state=None, incoming=None):
    k = a.shape[0]
    stats = GroupStats.from_gram(a @ a.T)
    w, new = plugin.update(stats, torch.ones(k, dtype=f64) if incoming is None else incoming, state or plugin.init())
    return w, new


def _cases():
    gen = torch.Generator().manual_seed(8)
    g, h = torch.randn(2, 7, generator=gen, dtype=f64)
    yield "random", torch.randn(5, 9, generator=gen, dtype=f64)
    yield "k=1", g[None]
    yield "collinear", torch.stack([g, 3 * g, 0.1 * g])
    yield "norms 1e±12", torch.stack([g * 1e-12, h, (g + h) * 1e12])
    yield "correlated", torch.stack([g, g + 0.01 * h, h])


@pytest.mark.parametrize(("name", "a"), list(_cases()), ids=[n for n, _ in _cases()])
def test_weights_solve_the_bargaining_equation(name, a):
    w, _ = _update(NashMTL(max_norm=0.0), a)
    assert torch.isfinite(w).all() and (w > 0).all()
    residual = w * (a @ (a.T @ w)) - 1.0
    assert residual.abs().max() < 1e-8
    torch.testing.assert_close(w, _reference_alpha(a), rtol=1e-7, atol=0)
    assert abs((w @ a).norm().item() - a.shape[0] ** 0.5) < 1e-7  # ‖d‖² = Σ α_i g_iᵀd = k


def test_max_norm_clips_the_update():
    a = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=f64)
    w, _ = _update(NashMTL(max_norm=0.5), a)
    torch.testing.assert_close((w @ a).norm(), torch.tensor(0.5, dtype=f64))
    torch.testing.assert_close(w, _reference_alpha(a, 0.5), rtol=1e-7, atol=0)


def test_degenerate_cases_are_finite():
    g = torch.tensor([[1.0, 2.0, 0.0]], dtype=f64)
    h = torch.tensor([[0.0, 1.0, 1.0]], dtype=f64)
    for a in (torch.cat([g, -g]), torch.cat([g, torch.zeros_like(g), h]), torch.zeros(3, 3, dtype=f64)):
        w, _ = _update(NashMTL(), a)
        assert torch.isfinite(w).all()
    w, _ = _update(NashMTL(max_norm=0.0), torch.cat([g, torch.zeros_like(g), h]))
    assert w[1] == 0.0  # a zero gradient has no bargaining solution: weight 0
    torch.testing.assert_close(w[[0, 2]], _reference_alpha(torch.cat([g, h])), rtol=1e-7, atol=0)


@pytest.mark.anchors
@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_equals_torchjd(torchjd_aggregation, seed, max_norm):
    """torchjd's cvxpy/ECOS loop stops at ‖Gα - 1/α‖ < 1e-3: measured within 3e-8 relative here."""
    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed
    a = torch.randn(k, 12, generator=gen, dtype=f64) * 3
    reference = torchjd_aggregation.NashMTL(n_tasks=k, max_norm=max_norm)
    plugin = NashMTL(max_norm=max_norm)
    state = plugin.init()
    for _ in range(2):
        w, state = _update(plugin, a, state)
        expected = reference(a)  # element-wise, a coordinate may cancel to ~0: atol relative to the vector
        torch.testing.assert_close(w @ a, expected, rtol=1e-5, atol=1e-5 * expected.norm().item())


def test_update_weights_every_reuses_the_weights():
    gen = torch.Generator().manual_seed(3)
    a1, a2, a3 = (torch.randn(3, 6, generator=gen, dtype=f64) for _ in range(3))
    plugin = NashMTL(update_weights_every=2, max_norm=0.0)
    w1, state = _update(plugin, a1)
    w2, state = _update(plugin, a2, state)
    w3, state = _update(plugin, a3, state)
    torch.testing.assert_close(w1, _reference_alpha(a1), rtol=1e-7, atol=0)
    assert torch.equal(w2, w1)
    torch.testing.assert_close(w3, _reference_alpha(a3), rtol=1e-7, atol=0)
    assert state["updates"] == 3 and set(state["alpha"]) == {"g0", "g1", "g2"}


def test_incoming_weights_compose():
    a = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    v = torch.tensor([2.0, 0.5, 1.5], dtype=f64)
    w, _ = _update(NashMTL(max_norm=0.0), a, incoming=v)
    torch.testing.assert_close(w, v * _reference_alpha(v[:, None] * a), rtol=1e-7, atol=0)


def _flat(params):
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _step(opt, model, batches, group_loss):
    losses = {name: group_loss(model, batch) for name, batch in batches.items()}
    opt.zero_grad()
    opt.backward(losses)
    opt.step()


def test_real_model_update_is_lr_times_direction(real_model_step):
    update, grads = real_model_step(["nash_mtl"], 0.05)
    torch.testing.assert_close(update, 0.05 * _reference_alpha(grads, 1.0) @ grads, rtol=1e-7, atol=1e-12)


def test_state_round_trip_through_the_optimizer(make_model, make_batches, group_loss):
    model = make_model(dtype=f64)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.01), plugins=[("nash_mtl", {"update_weights_every": 3})])
    batches = make_batches(dtype=f64)
    for _ in range(2):
        _step(opt, model, batches, group_loss)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    clone = copy.deepcopy(model)
    opt2 = Balancer(torch.optim.SGD(clone.parameters(), lr=0.01), plugins=[("nash_mtl", {"update_weights_every": 3})])
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        _step(opt, model, batches, group_loss)
        _step(opt2, clone, batches, group_loss)
        assert torch.equal(opt.last_stats.weights, opt2.last_stats.weights)
        assert torch.equal(_flat(model.parameters()), _flat(clone.parameters()))
