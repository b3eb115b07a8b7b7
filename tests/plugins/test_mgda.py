"""mgda (Désidéri 2012; Sener & Koltun 2018): the min-norm point on explicit vectors, torchjd, LibMTL, a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balancer.plugins import MGDA
from tests.plugins.anchors import min_norm_point as _reference  # float64 SLSQP on the explicit rows
from tests.plugins.cases import case_params, gradient_cases

f64 = torch.float64


CASES = gradient_cases(
    5,
    random_shape=(5, 9),
    badly_scaled=(1e-3, 1e3),
    names=("random", "rank-deficient", "collinear", "k=1", "badly scaled"),
)


@pytest.mark.parametrize(("name", "a"), case_params(CASES))
def test_direction_is_the_min_norm_point(name, a, direction):
    w, d = direction(MGDA(), a)
    assert torch.isfinite(w).all() and abs(w.sum().item() - 1) < 1e-9 and (w >= 0).all()
    # d is the min-norm point of the hull iff g_iᵀd ≥ ‖d‖² for every i (an exact characterisation).
    assert (a @ d >= (d @ d) - 1e-10 * a.norm(dim=1).max() ** 2).all()
    ref = _reference(a)
    # When 0 is in the hull (rank-deficient) both norms are solver noise (ours ~5e-13, SLSQP's 2e-13 to
    # 3e-10 by machine): an absolute floor scaled by the gradients; a wrong face is off by O(‖g‖).
    assert d.norm() <= ref.norm() * (1 + 1e-9) + 1e-9 * a.norm(dim=1).max()
    if name != "badly scaled":  # SLSQP itself fails there (off by 1e2); the optimality test above holds
        torch.testing.assert_close(d, ref, rtol=1e-6, atol=1e-8 * a.norm(dim=1).max())


@pytest.mark.parametrize(
    ("a", "expected"),
    [
        (torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.5, -3.0]], dtype=f64), 0.0),  # opposite pair: 0 in the hull
        (torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.5, -3.0]], dtype=f64), 0.0),  # zero gradient
        (torch.tensor([[1e-12, 0.0], [0.0, 1.0], [1e12, 1e12]], dtype=f64), 1e-12),  # norms 1e±12: near g_1
    ],
)
def test_pareto_stationary_and_extreme_cases(a, expected, direction):
    w, d = direction(MGDA(), a)
    assert torch.isfinite(w).all()
    # ‖Σ w_i g_i‖ is computed to about eps·Σ|w_i|‖g_i‖: that (times 1e4) is the floor, so weight left
    # on a long gradient where the point is 0 (or 1e-12 long) still fails.
    assert d.norm() <= expected * (1 + 1e-9) + 1e-12 * (w.abs() @ a.norm(dim=1))


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(6))
def test_equals_torchjd_with_two_groups(torchjd_aggregation, seed, direction):
    """With 2 groups torchjd's Frank-Wolfe step is an exact line search over the whole hull."""
    a = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed), dtype=f64)
    w, d = direction(MGDA(), a)
    ref = torchjd_aggregation.MGDA()(a)
    # Element-wise, a coordinate of the direction may cancel to ~0: the tolerance is relative to the vector.
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5 * ref.norm().item())
    # Weights on the simplex (they sum to 1): a weight at a face is 0 here and ~1e-17 there, so absolute too.
    torch.testing.assert_close(w, torchjd_aggregation.MGDAWeighting()(a @ a.T), rtol=1e-5, atol=1e-5)


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_torchjd(torchjd_aggregation, seed, direction):
    """With more groups torchjd's Frank-Wolfe (epsilon=1e-3, at most 100 steps, and it cannot take weight
    off a vertex) stops short: measured up to ~1e-2 relative from the optimum, which is why equality to
    1e-5 is not asserted. Its point is never closer to 0 than ours, and is close to it."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3 + seed % 4, 8, generator=gen, dtype=f64)
    _, d = direction(MGDA(), a)
    ref = torchjd_aggregation.MGDA()(a)
    assert d.norm() <= ref.norm() * (1 + 1e-12) + 1e-12 * a.norm(dim=1).max()
    assert (d - ref).norm() <= 0.15 * d.norm()  # measured: up to 0.097 with its defaults
    tight = torchjd_aggregation.MGDA(epsilon=1e-15, max_iters=100_000)(a)
    assert (d - tight).norm() <= 1e-3 * d.norm()  # measured: up to 4.6e-4 (Frank-Wolfe is sublinear)


def _libmtl_direction(libmtl, a, losses, ntype):
    """LibMTL's MGDA internals on a prepared gradient matrix (its backward needs a whole model)."""
    mgda = libmtl.MGDA()
    mgda.device = torch.device("cpu")
    grads = mgda._gradient_normalizers(a.float(), losses.float(), ntype=ntype)  # its solver is float32-only
    sol = mgda._find_min_norm_element(grads)
    return sol.to(f64) @ grads.to(f64)


@pytest.mark.anchors
@pytest.mark.parametrize("ntype", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_libmtl(libmtl, ntype, seed, direction):
    """LibMTL 1.1.5 works in float32 and stops when the step is below 1e-5: equal to ~1e-5. Two
    differences avoided here: with 2 groups it clamps the weight to [0.001, 0.999] (the exact answer
    may be 0 or 1), and when it does not converge in 250 steps it returns None."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3 + seed, 10, generator=gen, dtype=f64)
    losses = torch.rand(a.shape[0], generator=gen, dtype=f64) + 0.5
    _, d = direction(MGDA(normalization=ntype), a, losses=losses)
    ref = _libmtl_direction(libmtl, a, losses, ntype)
    assert d.norm() <= ref.norm() * (1 + 1e-6) + 1e-9 * a.norm(dim=1).max()
    factor = {"none": 1, "l2": a.norm(dim=1), "loss": losses, "loss+": losses * a.norm(dim=1)}[ntype]
    normalised = a / torch.as_tensor(factor, dtype=f64).reshape(-1, 1)
    if (normalised @ ref >= ref @ ref * (1 - 1e-4)).all():  # LibMTL converged (it did not for seed 2, loss+)
        assert (d - ref).norm() <= 2e-4 * d.norm()  # measured: 6e-6 to 8.5e-5


@pytest.mark.anchors
def test_libmtl_nan_cases_are_finite_here(libmtl, direction):
    """LibMTL's 'l2' normalisation divides a zero gradient by 0 (NaN); here the factor counts as 1."""
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 1.0]], dtype=f64)
    ones = torch.ones(3, dtype=f64)
    with np.errstate(all="ignore"):
        assert torch.isnan(libmtl.MGDA()._gradient_normalizers(a.float(), ones.float(), ntype="l2")).any()
    w, d = direction(MGDA(normalization="l2"), a)
    assert torch.isfinite(w).all() and d.norm() < 1e-12 * a.norm(dim=1).max()


@pytest.mark.parametrize("norm", [1e-30, 1e-8, 1e4, 1e10, 1e30])
def test_weights_do_not_depend_on_the_gradient_scale(norm, direction):
    """The min-norm point scales with the gradients, its weights not at all. A regression: the
    solver's feasibility tolerance used to be absolute in the caller's units, and from gradient
    norms of about 1e9 on it returned a wrong face of the hull for some draws."""
    for seed in range(20):
        a = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=f64)
        w, _ = direction(MGDA(), a)
        torch.testing.assert_close(direction(MGDA(), a * norm)[0], w, rtol=1e-10, atol=1e-12)


def test_normalizations_follow_the_formula(direction):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, generator=gen, dtype=f64)
    losses = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=f64)
    for name, n in [("l2", a.norm(dim=1)), ("loss", losses), ("loss+", losses * a.norm(dim=1))]:
        _, d = direction(MGDA(normalization=name), a, losses=losses)
        torch.testing.assert_close(
            d, _reference(a / n[:, None]), rtol=1e-6, atol=1e-9 * (a / n[:, None]).norm(dim=1).max()
        )
    _, d_nan = direction(MGDA(normalization="loss"), a)  # losses unknown (nan): no loss normalisation
    torch.testing.assert_close(d_nan, _reference(a), rtol=1e-6, atol=1e-9 * a.norm(dim=1).max())


def test_incoming_weights_compose(direction):
    a = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    v = torch.tensor([2.0, 0.5, 1.5], dtype=f64)
    _, d = direction(MGDA(), a, incoming=v)
    torch.testing.assert_close(d, _reference(v[:, None] * a), rtol=1e-6, atol=1e-9 * (v[:, None] * a).norm(dim=1).max())


def test_real_model_update_is_lr_times_direction(real_model_step):
    update, grads = real_model_step(["mgda"], 0.05)
    torch.testing.assert_close(update, 0.05 * _reference(grads), rtol=1e-6, atol=1e-9 * 0.05 * grads.norm(dim=1).max())
