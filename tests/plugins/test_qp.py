"""plugins/_qp.py: the batched nonnegative-QP solver against scipy and against its KKT conditions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, nnls

import balancer.plugins._qp as qp
from balancer.contract.testing import _no_host_sync
from balancer.plugins._qp import kkt_residual, min_norm_point, solve_nonneg_qp

f64 = torch.float64


def _random_problem(seed, k, n, spread=0.0):
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (torch.rand(k, 1, generator=gen, dtype=f64) * 2 * spread - spread)
    a = torch.randn(k, n, generator=gen, dtype=f64) * scales
    return a, a @ a.T


def _nnls_reference(gram, linear):
    """min ½xᵀGx + qᵀx, x ≥ 0 as least squares: G = LLᵀ gives ½‖Lᵀx + L⁻¹q‖² + const."""
    chol = np.linalg.cholesky(gram)
    return nnls(chol.T, -np.linalg.solve(chol, linear), maxiter=10_000)[0]


@pytest.mark.parametrize("seed", range(20))
def test_matches_nnls_on_positive_definite_problems(seed):
    k = 2 + seed % 15
    a, gram = _random_problem(seed, k, k + 5, spread=1.5)
    linear = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=f64) * gram.diagonal().sqrt()
    x = solve_nonneg_qp(gram, linear)
    ref = _nnls_reference(gram.numpy(), linear.numpy())
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    assert kkt_residual(gram, linear, x).item() < 1e-12


@pytest.mark.parametrize("seed", range(10))
def test_batched_projections_match_one_by_one_and_kkt(seed):
    k = 3 + seed
    _, gram = _random_problem(seed, k, 2 * k, spread=3.0)
    batched = solve_nonneg_qp(gram, gram)  # UPGrad's k problems
    for i in range(k):
        single = solve_nonneg_qp(gram, gram[i])
        torch.testing.assert_close(batched[i], single, rtol=1e-12, atol=1e-14)
    assert kkt_residual(gram.expand(k, k, k), gram, batched).max().item() < 1e-10


@pytest.mark.parametrize("seed", range(10))
def test_min_norm_point_matches_slsqp(seed):
    k = 2 + seed
    a, gram = _random_problem(seed, k, 3 * k)
    w = min_norm_point(gram)
    ref = minimize(
        lambda v: v @ gram.numpy() @ v,
        np.full(k, 1.0 / k),
        jac=lambda v: 2 * gram.numpy() @ v,
        bounds=[(0, 1)] * k,
        constraints={"type": "eq", "fun": lambda v: v.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    ).x
    assert abs(w.sum().item() - 1) < 1e-12 and (w >= 0).all()
    scale = gram.diagonal().max().item()  # ‖g‖² of the longest gradient: the floor of both squared norms
    assert (w @ gram @ w).item() <= ref @ gram.numpy() @ ref * (1 + 1e-10) + 1e-14 * scale
    torch.testing.assert_close(w @ a, torch.from_numpy(ref) @ a, rtol=1e-6, atol=1e-9 * scale**0.5)


def _adversarial():
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(1, 6, generator=gen, dtype=f64)
    other = torch.randn(1, 6, generator=gen, dtype=f64)
    yield "k=1", g
    yield "duplicated", torch.cat([g, g, other])
    yield "opposite", torch.cat([g, -g])
    yield "opposite+1", torch.cat([g, -g, other])
    yield "zero row", torch.cat([g, torch.zeros_like(g), other])
    yield "all zero", torch.zeros(3, 6, dtype=f64)
    yield "rank 2", torch.randn(6, 2, generator=gen, dtype=f64)
    yield "collinear", g * torch.tensor([[1.0], [2.0], [0.5]], dtype=f64)
    yield "norms 1e±12", torch.randn(4, 6, generator=gen, dtype=f64) * torch.tensor([[1e-12], [1], [1e12], [3]])


@pytest.mark.parametrize(("name", "a"), list(_adversarial()), ids=[n for n, _ in _adversarial()])
def test_adversarial_problems_are_finite_and_accurate(name, a):
    gram = a @ a.T
    k = gram.shape[0]
    x = solve_nonneg_qp(gram, gram)
    assert torch.isfinite(x).all()
    # Singular problems lose the exact polishing step; the interior point is still good to ~1e-9.
    assert kkt_residual(gram.expand(k, k, k), gram, x).max().item() < 1e-8
    w = min_norm_point(gram)
    assert torch.isfinite(w).all() and abs(w.sum().item() - 1) < 1e-9
    norms = a.norm(dim=1)
    # ‖Σ w_i g_i‖ is computed to about eps·Σ|w_i|‖g_i‖: that (times 1e4) is the floor, so weight left
    # on a long gradient (norms 1e±12) still fails.
    assert (w @ a).norm() <= norms.min() * (1 + 1e-9) + 1e-12 * (w.abs() @ norms)


def test_min_norm_point_of_opposite_and_tiny_gradients():
    g = torch.tensor([[1.0, 2.0, 0.0]], dtype=f64)
    torch.testing.assert_close(
        min_norm_point(torch.cat([g, -3 * g]) @ torch.cat([g, -3 * g]).T), torch.tensor([0.75, 0.25], dtype=f64)
    )
    a = torch.tensor([[1e-12, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=f64)
    torch.testing.assert_close(min_norm_point(a @ a.T), torch.tensor([1.0, 0.0, 0.0], dtype=f64), atol=1e-11, rtol=0)


def test_no_host_sync_and_stays_on_device():
    _, gram = _random_problem(0, 5, 8)
    with _no_host_sync("qp"):
        x = solve_nonneg_qp(gram, gram)
        w = min_norm_point(gram)
    assert x.device == gram.device and w.dtype == f64


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 12),
    extra=st.integers(-3, 6),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 6.0),
)
def test_kkt_conditions_hold(k, extra, seed, spread):
    """x ≥ 0, ∇ = Gx + q ≥ 0 and x ∘ ∇ = 0, for PSD G of any rank and q = G u (bounded problems)."""
    _, gram = _random_problem(seed, k, max(1, k + extra), spread=spread)
    u = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=f64)
    linear = gram @ u
    x = solve_nonneg_qp(gram, linear)
    assert (x >= 0).all() and torch.isfinite(x).all()
    assert kkt_residual(gram, linear, x).item() < 1e-8


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [1e-30, 1e-5, 1e5, 1e30])
def test_solution_does_not_depend_on_the_scale_of_the_problem(seed, scale):
    """Multiplying G and q by c changes nothing in the minimiser (and min_norm_point's weights do
    not depend on c either). A regression: the solver divided q by max|q| before the Jacobi
    scaling, not after, so its tolerances were absolute in the caller's units, and large Gram
    matrices got a wrong support."""
    k = 2 + seed % 5
    _, gram = _random_problem(seed, k, 3)
    u = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=f64)
    x = solve_nonneg_qp(gram, gram @ u)
    torch.testing.assert_close(solve_nonneg_qp(gram * scale, gram @ u * scale), x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(min_norm_point(gram * scale), min_norm_point(gram), rtol=1e-10, atol=1e-12)


def test_one_gram_matrix_for_the_whole_batch():
    _, gram = _random_problem(0, 3, 5)
    with pytest.raises(ValueError, match="one \\[k, k\\] Gram matrix"):
        solve_nonneg_qp(gram.expand(2, 3, 3), gram[:2])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_enumeration_finds_the_zero_solution(k, monkeypatch):
    """A nonnegative ``q`` (UPGrad without conflicts: ``q = G e_i ≥ 0``) has the minimiser 0, the
    empty support: the enumeration must find it itself, not leave it to the interior point."""
    monkeypatch.setattr(qp, "_interior_solution", lambda *a: pytest.fail("fell back to the interior point"))
    a = torch.rand(k, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(k))  # all inner products > 0
    gram = a @ a.T
    x = qp.solve_nonneg_qp(gram, torch.eye(k, dtype=torch.float64) @ gram)
    assert torch.equal(x, torch.zeros(k, k, dtype=torch.float64))


def test_large_batched_solves_do_not_hang_with_several_threads():
    """torch's batched CPU LU hangs in MKL with more than one thread from n ≈ 151 on (pytorch#142815):
    UPGrad and CAGrad at k = 200 must finish, and agree with the one-thread result. A subprocess,
    so that a hang fails the test instead of blocking the suite."""
    script = textwrap.dedent(
        """
        import torch
        from balancer import GroupStats
        from balancer.plugins import CAGrad, UPGrad
        from balancer.plugins._qp import batched_solve
        a = torch.randn(200, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        stats, ones = GroupStats.from_gram(a @ a.T), torch.ones(200, dtype=torch.float64)
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = [a.T @ p.update(stats, ones, p.init())[0] for p in (UPGrad(), CAGrad())]
        for one, two in zip(out[1], out[2]):  # directions: rank 30 < 200 groups leaves the weights free
            assert torch.allclose(one, two, rtol=0, atol=1e-7 * a.norm(dim=1).max()), (one - two).abs().max()
        m = torch.eye(160, dtype=torch.float64).expand(3, 160, 160) * 2
        x = batched_solve(m, torch.ones(3, 160, dtype=torch.float64))
        assert torch.equal(x, torch.full((3, 160), 0.5, dtype=torch.float64))
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
