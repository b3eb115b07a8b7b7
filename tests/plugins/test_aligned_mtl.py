"""aligned_mtl (Senushkin et al. 2023): the update equals the mean of the aligned gradients
computed by an SVD of the explicit gradient matrix, equals torchjd 0.18 for every scale mode, and a
real model's update. LibMTL 1.1.5 does not implement Aligned-MTL."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import AlignedMTL

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _weights(grads, incoming=None, **options):
    k = grads.shape[0]
    stats = GroupStats.from_gram(grads @ grads.T)
    ones = torch.ones(k, dtype=F64) if incoming is None else incoming
    return AlignedMTL(**options).update(stats, ones, {})[0]


def _reference(grads, scale_mode="min"):
    """Aligned gradients from the SVD A = U Σ Wᵀ: Â = σ_s U Wᵀ (kept singular values), mean of rows."""
    k = grads.shape[0]
    u, sigma, wt = torch.linalg.svd(grads, full_matrices=False)
    kept = sigma**2 > k * EPS * (sigma**2).max()
    if not kept.any():
        return grads.mean(0)
    eig = sigma[kept] ** 2
    scale = {"min": eig.min(), "median": eig.median(), "mean": eig.mean(), "rmse": eig.mean()}[scale_mode]
    aligned = scale.sqrt() * u[:, kept] @ wt[kept]
    return aligned.mean(0)


def _close(direction, expected, grads, rtol=1e-9):
    """Relative to the expected direction, with a floor at rounding level of the gradients it combines
    (a direction that cancels to ~0 is compared absolutely; a wrong one is off by O(‖g‖))."""
    floor = 1e-13 * grads.norm(dim=1).max()
    assert (direction - expected).norm() <= rtol * expected.norm() + floor, (direction, expected)


def _cases():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, 16, generator=gen, dtype=F64)
    return {
        "random2": base[:2],
        "random5": base * torch.logspace(-1, 1, 5, dtype=F64)[:, None],
        "rank2": torch.randn(4, 2, generator=gen, dtype=F64) @ torch.randn(2, 16, generator=gen, dtype=F64),
        "collinear": torch.stack([base[0], 3.0 * base[0], base[1]]),
        "opposite": torch.stack([base[0], -2.0 * base[0], base[1]]),
        "zero_row": torch.stack([base[0], torch.zeros(16, dtype=F64), base[1]]),
        "k1": base[:1],
        "badly_scaled": base[:3] * torch.tensor([[1e12], [1.0], [1e-12]], dtype=F64),
        "tiny": base[:3] * 1e-150,
    }


@pytest.mark.parametrize("scale_mode", ["min", "median", "mean", "rmse"])
@pytest.mark.parametrize(("case", "grads"), list(_cases().items()))
def test_matches_the_aligned_gradients_of_the_svd(case, grads, scale_mode):
    w = _weights(grads, scale_mode=scale_mode)
    assert torch.isfinite(w).all()
    _close(w @ grads, _reference(grads, scale_mode), grads, rtol=1e-8)


def test_weights_are_b_times_the_mean_preference():
    """B = √λ_min G^{-1/2} makes the aligned Gram B G Bᵀ equal to λ_min · I; the weights are B 1/k."""
    grads = _cases()["random5"]
    k = grads.shape[0]
    gram = grads @ grads.T
    vals, vecs = torch.linalg.eigh(gram)
    b = vals.min().sqrt() * vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    torch.testing.assert_close(b @ gram @ b.T, vals.min() * torch.eye(k, dtype=F64))
    torch.testing.assert_close(_weights(grads), b @ torch.full((k,), 1 / k, dtype=F64))


def test_all_zero_gradients_fall_back_to_the_mean_as_torchjd():
    w = _weights(torch.zeros(3, 4, dtype=F64))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=F64))


def test_global_scale_does_not_change_the_weights():
    grads = _cases()["random5"]
    for factor in (1e-100, 1e100):
        w = _weights(grads)
        torch.testing.assert_close(_weights(grads * factor), w, rtol=1e-10, atol=1e-10 * w.abs().max().item())


def test_incoming_weights_align_the_weighted_gradients():
    grads = _cases()["random5"]
    incoming = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5], dtype=F64)
    w = _weights(grads, incoming)
    _close(w @ grads, _reference(incoming[:, None] * grads), grads)


@pytest.mark.anchors
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("case", ["random2", "random5", "rank2", "collinear", "zero_row", "k1"])
def test_equals_torchjd(torchjd_aggregation, scale_mode, case):
    """torchjd's default preference vector is 1/k: the mean of the aligned gradients, as here."""
    grads = _cases()[case]
    expected = torchjd_aggregation.AlignedMTL(scale_mode=scale_mode)(grads)
    _close(_weights(grads, scale_mode=scale_mode) @ grads, expected, grads, rtol=1e-5)


def test_real_model_update_is_lr_times_the_aligned_mean(group_gradients):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    xs = [torch.randn(6, 5, dtype=F64) for _ in range(3)]
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.2), plugins=[("aligned_mtl", {"scale_mode": "median"})])
    params = list(model.parameters())
    losses = {f"t{i}": model(x).pow(2).mean() * s for i, (x, s) in enumerate(zip(xs, [1.0, 8.0, 0.1], strict=True))}
    grads = group_gradients(losses.values(), params)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.backward(losses)
    opt.step()
    _close(before - torch.cat([p.detach().reshape(-1) for p in params]), 0.2 * _reference(grads, "median"), 0.2 * grads)
