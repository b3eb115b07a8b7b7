"""dualproj (Quinton & Rey 2024): the projection of the mean on explicit vectors, torchjd 0.18, a real model."""

from __future__ import annotations

import pytest
import torch

from balancer.plugins import DualProj
from tests.plugins.cases import case_params, gradient_cases

f64 = torch.float64


@pytest.fixture
def reference(dual_cone_projection):
    """The paper's direction: the projection of the mean gradient onto the dual cone."""
    return lambda a: dual_cone_projection(a, a.mean(0))


CASES = gradient_cases(
    4,
    random_shape=(5, 7),
    names=("random", "rank-deficient", "collinear", "opposite", "zero row", "k=1", "badly scaled"),
)


@pytest.mark.parametrize(("name", "a"), case_params(CASES))
def test_direction_is_the_projected_mean(name, a, direction, reference):
    w, d = direction(DualProj(), a)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(d, reference(a), rtol=1e-6, atol=1e-7 * a.norm(dim=1).max())
    assert (a @ d >= -1e-9 * a.norm() ** 2).all()


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(8))
def test_equals_torchjd(torchjd_aggregation, seed, direction):
    """Same reg_eps convention as torchjd's default projector (1e-4 on the trace-normalised Gram)."""
    from torchjd._linalg import QuadprogProjector

    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed
    a = torch.randn(k, 3 * k, generator=gen, dtype=f64)
    # Element-wise, a coordinate of the direction may cancel to ~0: tolerances relative to the vector.
    regularised = torchjd_aggregation.DualProj()(a)
    torch.testing.assert_close(
        direction(DualProj(reg_eps=1e-4), a)[1], regularised, rtol=1e-5, atol=1e-5 * regularised.norm().item()
    )
    ref = torchjd_aggregation.DualProj(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(a)
    torch.testing.assert_close(direction(DualProj(), a)[1], ref, rtol=1e-5, atol=1e-5 * ref.norm().item())
    weights = torchjd_aggregation.DualProjWeighting()(a @ a.T)
    torch.testing.assert_close(direction(DualProj(reg_eps=1e-4), a)[0], weights, rtol=1e-5, atol=1e-8)


def test_incoming_weights_compose(direction, reference):
    a = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    v = torch.tensor([2.0, 0.5, 1.5], dtype=f64)
    _, d = direction(DualProj(), a, incoming=v)
    torch.testing.assert_close(d, reference(v[:, None] * a), rtol=1e-6, atol=1e-9 * (v[:, None] * a).norm(dim=1).max())


def test_real_model_update_is_lr_times_direction(real_model_step, reference):
    update, grads = real_model_step(["dualproj"], 0.05)
    torch.testing.assert_close(update, 0.05 * reference(grads), rtol=1e-6, atol=1e-9 * 0.05 * grads.norm(dim=1).max())
