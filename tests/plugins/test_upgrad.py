"""upgrad (Quinton & Rey 2024): the paper's projection on explicit vectors, torchjd 0.18, a real model."""

from __future__ import annotations

import pytest
import torch

from balancer.plugins import UPGrad
from tests.plugins.cases import case_params, gradient_cases

f64 = torch.float64


@pytest.fixture
def reference(dual_cone_projection):
    """The paper's direction: the mean of every gradient's projection onto the dual cone."""
    return lambda a: torch.stack([dual_cone_projection(a, g) for g in a]).mean(0)


CASES = gradient_cases(
    3,
    random_shape=(4, 7),
    names=("random", "rank-deficient", "collinear", "opposite", "zero row", "k=1", "badly scaled"),
)


@pytest.mark.parametrize(("name", "a"), case_params(CASES))
def test_direction_is_the_mean_of_the_projections(name, a, direction, reference):
    w, d = direction(UPGrad(), a)
    assert torch.isfinite(w).all()
    ref = reference(a)
    torch.testing.assert_close(d, ref, rtol=1e-6, atol=1e-7 * a.norm(dim=1).max())
    assert (a @ d >= -1e-9 * a.norm() ** 2).all()  # conflicts with no group


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(8))
def test_equals_torchjd(torchjd_aggregation, seed, direction):
    """torchjd's default projector adds reg_eps=1e-4 to the trace-normalised Gram (and zeroes it below
    a trace of norm_eps=1e-4): `reg_eps=1e-4` reproduces it; with reg_eps=0 both solve the exact projection."""
    from torchjd._linalg import QuadprogProjector

    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed
    a = torch.randn(k, 3 * k, generator=gen, dtype=f64) * (1 + 3 * torch.rand(k, 1, generator=gen, dtype=f64))
    # Element-wise, a coordinate of the direction may cancel to ~0: tolerances relative to the vector.
    _, d = direction(UPGrad(reg_eps=1e-4), a)
    regularised = torchjd_aggregation.UPGrad()(a)
    torch.testing.assert_close(d, regularised, rtol=1e-5, atol=1e-5 * regularised.norm().item())
    _, exact = direction(UPGrad(), a)
    ref = torchjd_aggregation.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(a)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5 * ref.norm().item())
    weights = torchjd_aggregation.UPGradWeighting()(a @ a.T)
    torch.testing.assert_close(direction(UPGrad(reg_eps=1e-4), a)[0], weights, rtol=1e-5, atol=1e-8)


@pytest.mark.anchors
def test_scale_invariant_unlike_torchjd_norm_eps(torchjd_aggregation, direction):
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=f64)
    w1, _ = direction(UPGrad(), a)
    w2, _ = direction(UPGrad(), a * 1e-8)
    torch.testing.assert_close(w1, w2, rtol=1e-10, atol=0)
    # torchjd zeroes Grams whose trace is below 1e-4 and then returns the plain mean.
    torch.testing.assert_close(
        torchjd_aggregation.UPGradWeighting()((a * 1e-4) @ (a * 1e-4).T), torch.full((3,), 1 / 3, dtype=f64)
    )


def test_incoming_weights_compose(direction, reference):
    a = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    v = torch.tensor([2.0, 0.5, 1.5], dtype=f64)
    w, d = direction(UPGrad(), a, incoming=v)
    torch.testing.assert_close(d, reference(v[:, None] * a), rtol=1e-6, atol=1e-9 * (v[:, None] * a).norm(dim=1).max())


def test_real_model_update_is_lr_times_direction(real_model_step, reference):
    lr = 0.05
    update, grads = real_model_step(["upgrad"], lr)
    torch.testing.assert_close(update, lr * reference(grads), rtol=1e-6, atol=1e-9 * lr * grads.norm(dim=1).max())
