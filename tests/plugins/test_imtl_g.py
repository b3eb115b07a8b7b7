"""imtl_g (Liu et al. 2021): equal projections of the update on every unit gradient, checked on
explicit vectors (the paper's closed form), against torchjd 0.18 and LibMTL 1.1.5, on a real model."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import IMTLG

F64 = torch.float64


def _weights(grads, incoming=None):
    k = grads.shape[0]
    stats = GroupStats.from_gram(grads @ grads.T)
    return IMTLG().update(stats, torch.ones(k, dtype=F64) if incoming is None else incoming, {})[0]


def _paper_closed_form(grads):
    """Liu et al. 2021, IMTL-G: with D = g_1 - g_i and U = u_1 - u_i (rows i ≥ 2),
    α_{2:} = g_1 Uᵀ (D Uᵀ)⁻¹ and α_1 = 1 - Σ α_{2:}, computed on the vectors."""
    units = grads / grads.norm(dim=1, keepdim=True)
    d = grads[:1] - grads[1:]
    u = units[:1] - units[1:]
    rest = grads[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([1 - rest.sum().reshape(1), rest])


def _close(direction, expected, grads, rtol=1e-9):
    """Relative to the expected direction, with a floor at rounding level of the gradients it combines
    (a direction that cancels to ~0 is compared absolutely; a wrong one is off by O(‖g‖))."""
    floor = 1e-13 * grads.norm(dim=1).max()
    assert (direction - expected).norm() <= rtol * expected.norm() + floor, (direction, expected)


def _assert_impartial(weights, grads, rtol=1e-9):
    """Σ a = 1 and d · g_i / ‖g_i‖ equal for every nonzero g_i."""
    direction = weights @ grads
    nonzero = grads.norm(dim=1) > 0
    projections = (grads[nonzero] @ direction) / grads[nonzero].norm(dim=1)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=F64), rtol=rtol, atol=rtol)
    # A projection d·u_i is computed to about eps·‖d‖, and equal projections may be small next to ‖d‖.
    torch.testing.assert_close(
        projections, projections[0].expand_as(projections), rtol=rtol, atol=rtol * direction.norm().item()
    )
    assert (projections > 0).all()


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_random_gradients_match_the_paper_closed_form(k, seed):
    grads = torch.randn(k, 20, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads = grads * torch.logspace(-2, 2, k, dtype=F64)[:, None]
    w = _weights(grads)
    expected = _paper_closed_form(grads)
    torch.testing.assert_close(w, expected, rtol=1e-8, atol=1e-12 * expected.abs().max().item())
    _assert_impartial(w, grads)


def test_badly_scaled_groups_keep_equal_projections():
    base = torch.randn(3, 20, generator=torch.Generator().manual_seed(7), dtype=F64)
    grads = base * torch.tensor([[1e12], [1.0], [1e-12]], dtype=F64)
    w = _weights(grads)
    assert torch.isfinite(w).all()
    _assert_impartial(w, grads, rtol=1e-6)


@pytest.mark.parametrize("scale", [2.0, 0.1, 1e6])
def test_collinear_gradients(scale):
    """Two gradients along the same direction: equal projections by construction; a ∝ 1/‖g_i‖."""
    base = torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = torch.stack([base[0], scale * base[0], base[1]])
    w = _weights(grads)
    _assert_impartial(w, grads, rtol=1e-8)
    torch.testing.assert_close(w[0] / w[1], torch.tensor(scale, dtype=F64), rtol=1e-8, atol=0)


def test_more_groups_than_dimensions_is_finite_and_normalised():
    """Four gradients in a 3-dimensional span: no update has four equal projections; the weights
    give the least-squares compromise ``C⁺1`` and still sum to one."""
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(4, 3, generator=gen, dtype=F64) @ torch.randn(3, 12, generator=gen, dtype=F64)
    w = _weights(grads)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))


def test_opposite_gradients_give_the_zero_update():
    base = torch.randn(2, 10, generator=torch.Generator().manual_seed(2), dtype=F64)
    grads = torch.stack([base[0], -3.0 * base[0]])
    assert _weights(grads).tolist() == [0.0, 0.0]


def test_zero_gradient_gets_weight_zero_others_unchanged():
    base = torch.randn(3, 10, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = torch.stack([base[0], torch.zeros(10, dtype=F64), base[1], base[2]])
    w = _weights(grads)
    assert w[1] == 0.0
    expected = _weights(base)  # a weight may be near 0: the floor is relative to the largest one
    torch.testing.assert_close(w[[0, 2, 3]], expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    assert _weights(torch.zeros(3, 5, dtype=F64)).tolist() == [0.0, 0.0, 0.0]


def test_single_group_and_incoming_weights():
    g = torch.randn(1, 6, dtype=F64)
    assert _weights(g).tolist() == [1.0]
    grads = torch.randn(3, 10, generator=torch.Generator().manual_seed(5), dtype=F64)
    incoming = torch.tensor([2.0, 0.5, -1.0], dtype=F64)
    w = _weights(grads, incoming)
    _assert_impartial(w / incoming, incoming[:, None] * grads)


@pytest.mark.anchors
@pytest.mark.parametrize("k", [2, 3, 6])
def test_equals_torchjd(torchjd_aggregation, k):
    grads = torch.randn(k, 30, generator=torch.Generator().manual_seed(k), dtype=F64)
    grads = grads * torch.logspace(-1, 1, k, dtype=F64)[:, None]
    _close(_weights(grads) @ grads, torchjd_aggregation.IMTLG()(grads), grads, rtol=1e-5)


@pytest.mark.anchors
def test_dependent_gradients_parallel_to_torchjd_with_another_scale(torchjd_aggregation):
    """With dependent gradients the coefficients are not unique, so ``Σ a = 1`` does not fix the
    length: torchjd normalises the minimum-norm ``G⁺n``, this plugin ``D⁻¹C⁺1``. Both updates are
    the same minimum-norm impartial direction; for g_2 = 4 g_1 torchjd's is 3.4 g_1, ours 1.6 g_1."""
    base = torch.randn(2, 30, generator=torch.Generator().manual_seed(9), dtype=F64)
    collinear = torch.stack([base[0], 4.0 * base[0], base[1]])
    ours, theirs = _weights(collinear) @ collinear, torchjd_aggregation.IMTLG()(collinear)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(ours, theirs, dim=0), torch.tensor(1.0, dtype=F64))
    pair = collinear[:2]
    torch.testing.assert_close(_weights(pair) @ pair, 1.6 * base[0])
    torch.testing.assert_close(torchjd_aggregation.IMTLG()(pair), 3.4 * base[0])


@pytest.mark.anchors
def test_torchjd_drops_a_group_1e9_times_smaller_and_we_do_not(torchjd_aggregation):
    """torchjd pseudo-inverts G itself: an eigenvalue 1e-18 times the largest is below its rank
    threshold, so the small group's projection is not balanced. On the cosine matrix it is."""
    base = torch.randn(3, 20, generator=torch.Generator().manual_seed(8), dtype=F64)
    grads = base * torch.tensor([[1.0], [1.0], [1e-9]], dtype=F64)
    _assert_impartial(_weights(grads), grads, rtol=1e-6)
    theirs = torchjd_aggregation.IMTLG()(grads)
    projections = grads @ theirs / grads.norm(dim=1)
    assert (projections[2] - projections[0]).abs() > 1e-3 * projections[0].abs()


def _libmtl_imtl(libmtl, grads):
    method = libmtl.IMTL()
    method.task_num, method.rep_grad, method.device = grads.shape[0], False, grads.device
    method.init_param()
    method._get_grads = lambda losses, mode: grads.clone()
    captured = []
    method._backward_new_grads = lambda alpha, grads: captured.append(alpha @ grads)
    alpha = method.backward(torch.zeros(grads.shape[0], dtype=F64))
    return torch.as_tensor(alpha, dtype=F64), captured[0].detach()


@pytest.mark.anchors
@pytest.mark.parametrize("k", [2, 3, 5])
def test_equals_libmtl_at_initial_loss_scales(libmtl, k):
    """LibMTL's IMTL is the hybrid IMTL-L + IMTL-G; with its loss scales at their initial 0 the
    gradients are unscaled and its α is IMTL-G's (float32 loss scales: hence 1e-5)."""
    grads = torch.randn(k, 25, generator=torch.Generator().manual_seed(10 + k), dtype=F64)
    alpha, direction = _libmtl_imtl(libmtl, grads)
    w = _weights(grads)
    torch.testing.assert_close(w, alpha, rtol=1e-5, atol=1e-8)
    _close(w @ grads, direction, grads, rtol=1e-5)


@pytest.mark.anchors
def test_zero_gradient_is_nan_in_libmtl_finite_here(libmtl):
    grads = torch.randn(3, 10, generator=torch.Generator().manual_seed(6), dtype=F64)
    grads[2] = 0.0
    alpha, _ = _libmtl_imtl(libmtl, grads)
    assert torch.isnan(alpha).any()
    assert torch.isfinite(_weights(grads)).all()


def test_real_model_update_is_lr_times_the_impartial_direction(group_gradients):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    xs = [torch.randn(6, 5, dtype=F64) for _ in range(3)]
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["imtl_g"])
    params = list(model.parameters())
    losses = {f"t{i}": model(x).pow(2).mean() * s for i, (x, s) in enumerate(zip(xs, [1.0, 30.0, 0.01], strict=True))}
    grads = group_gradients(losses.values(), params)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.backward(losses)
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    expected = _paper_closed_form(grads) @ grads
    _close(before - after, 0.1 * expected, 0.1 * grads, rtol=1e-9)
    _assert_impartial(opt.last_stats.weights, grads)
