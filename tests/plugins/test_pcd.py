"""pcd (Priority-Constrained Descent, TMLR 2026): the paper's QP on explicit vectors, torchjd 0.18's stateful PCD
step for step (random, infeasible and degenerate problems), the EMA kept per group name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balancer import GroupStats
from balancer.errors import PluginError
from balancer.plugins import PCD

F64 = torch.float64


def _rows(k: int, gen: torch.Generator, dim: int = 6) -> torch.Tensor:
    return torch.randn(k, dim, generator=gen, dtype=F64) * torch.logspace(-2, 2, k, dtype=F64)[:, None]


def _run(plugin: PCD, grams: list[torch.Tensor], names: list[str] | None = None) -> list[torch.Tensor]:
    state, out = plugin.init(), []
    for gram in grams:
        k = gram.shape[0]
        stats = GroupStats.from_gram(gram, names or [f"g{i}" for i in range(k)])
        w, state = plugin.update(stats, torch.ones(k, dtype=F64), state)
        out.append(w)
    return out


def _torchjd(weighting, grams: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [weighting(gram) for gram in grams]


def _assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor], rtol: float) -> float:
    """Each step's weights to ``rtol`` of that step's largest weight; returns the largest such difference."""
    worst = 0.0
    for w, r in zip(ours, ref, strict=True):
        scale = float(r.abs().max()) or 1.0
        torch.testing.assert_close(w, r, rtol=0, atol=rtol * scale)
        worst = max(worst, float((w - r).abs().max()) / scale)
    return worst


@pytest.mark.anchors
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9, 12])
@pytest.mark.parametrize("tau", [0.02, 0.5, 1.0])
def test_equals_torchjd_step_for_step(torchjd_aggregation, k: int, tau: float) -> None:
    """The same sequence of Gram matrices fed to both (stateful): norms spread over 1e±2, and with k > 6
    more groups than dimensions (dependent gradients). torchjd's solver tolerance is 1e-9; measured 1e-12."""
    gen = torch.Generator().manual_seed(10 * k)
    grams = [(a := _rows(k, gen)) @ a.T for _ in range(6)]
    ref = _torchjd(torchjd_aggregation.PCDWeighting(tau=tau, beta=0.9), grams)
    _assert_close(_run(PCD(primary="g0", tau=tau, beta=0.9), grams), ref, rtol=1e-8)


@pytest.mark.anchors
def test_group_tau_equals_torchjd_vector_tau(torchjd_aggregation) -> None:
    gen = torch.Generator().manual_seed(3)
    grams = [(a := _rows(4, gen)) @ a.T for _ in range(4)]
    taus = torch.tensor([0.3, 0.0, 0.9], dtype=F64)
    ref = _torchjd(torchjd_aggregation.PCDWeighting(tau=taus), grams)
    plugin = PCD(primary="g0", tau=0.5, group_tau={"g1": 0.3, "g2": 0.0, "g3": 0.9, "absent": 0.1})
    _assert_close(_run(plugin, grams), ref, rtol=1e-8)


def _opposite(a: torch.Tensor) -> torch.Tensor:
    a[2] = -3.0 * a[1]  # two opposite secondary gradients: no d improves both by a positive amount
    return a


def _cancelling(a: torch.Tensor) -> torch.Tensor:
    a[-1] = -(a[1] + a[-2])  # 0 in the cone of three secondary gradients (two opposite ones at k = 3): infeasible
    return a


def _zero_primary(a: torch.Tensor) -> torch.Tensor:
    a[0] = 0.0
    return a


def _zero_secondary(a: torch.Tensor) -> torch.Tensor:
    a[1] = 0.0
    return a


def _duplicated(a: torch.Tensor) -> torch.Tensor:
    a[2] = 2.0 * a[1]
    return a


def _aligned_with_primary(a: torch.Tensor) -> torch.Tensor:
    a[1] = -0.5 * a[0]  # a secondary opposite to the primary: the constrained direction may be 0
    return a


@pytest.mark.anchors
@pytest.mark.parametrize(
    "case", [_opposite, _cancelling, _zero_primary, _zero_secondary, _duplicated, _aligned_with_primary]
)
@pytest.mark.parametrize("k", [3, 4, 11])
def test_degenerate_problems_equal_torchjd(torchjd_aggregation, case, k: int) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(k)
    grams = [(a := case(torch.randn(k, 16, generator=gen, dtype=F64))) @ a.T for _ in range(3)]
    ours = _run(PCD(primary="g0"), grams)
    _assert_close(ours, _torchjd(torchjd_aggregation.PCDWeighting(), grams), rtol=1e-8)
    assert all(torch.isfinite(w).all() for w in ours)
    if case in (_opposite, _cancelling):  # constraints dropped: the update is the primary gradient itself
        primary_only = torch.zeros(k, dtype=F64).index_fill(0, torch.tensor([0]), 1.0)
        assert all(torch.allclose(w, primary_only, rtol=1e-12, atol=0) for w in ours)
    if case is _zero_primary:
        assert all((w == 0).all() for w in ours)


@pytest.mark.anchors
def test_nonfinite_gram_gives_nan_like_torchjd(torchjd_aggregation) -> None:
    gram = torch.eye(3, dtype=F64)
    gram[1, 2] = gram[2, 1] = torch.nan
    (ours,) = _run(PCD(primary="g0"), [gram])
    assert torch.isnan(ours).all() and torch.isnan(torchjd_aggregation.PCDWeighting()(gram)).all()


def _reference_direction(a: torch.Tensor, taus: list[float]) -> torch.Tensor:
    """The paper's QP on explicit unit vectors (one step, β = 0, ε = 0: g̃_i = g_i/‖g_i‖), by SLSQP
    in the parameter space, rescaled to ‖g_1‖."""
    from scipy.optimize import minimize

    unit = (a / a.norm(dim=1, keepdim=True)).numpy()
    target = unit[0]
    cons = [
        {"type": "ineq", "fun": lambda d, j=j: unit[j] @ d - taus[j - 1], "jac": lambda d, j=j: unit[j]}
        for j in range(1, len(unit))
    ]
    res = minimize(
        lambda d: 0.5 * ((d - target) ** 2).sum(), target, jac=lambda d: d - target, constraints=cons,
        method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000},
    )  # fmt: skip
    d = torch.from_numpy(np.asarray(res.x))
    return d * a[0].norm() / d.norm()


@pytest.mark.parametrize("seed", range(5))
def test_direction_solves_the_papers_qp(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed
    a = torch.randn(k, 3 * k, generator=gen, dtype=F64) * (0.1 + 3 * torch.rand(k, 1, generator=gen, dtype=F64))
    taus = [0.1 * (1 + j % 3) for j in range(k - 1)]
    plugin = PCD(primary="g0", beta=0.0, eps=0.0, group_tau={f"g{j + 1}": t for j, t in enumerate(taus)})
    (w,) = _run(plugin, [a @ a.T])
    d = w @ a
    ref = _reference_direction(a, taus)
    torch.testing.assert_close(d, ref, rtol=0, atol=1e-6 * float(ref.norm()))
    assert torch.isclose(d.norm(), a[0].norm(), rtol=1e-12)  # rescaled to the primary gradient's norm
    assert (w >= 0).all()  # the multipliers of the constraints are nonnegative


def test_primary_is_found_by_name_anywhere_in_the_step() -> None:
    gen = torch.Generator().manual_seed(5)
    grams = [(a := _rows(4, gen)) @ a.T for _ in range(3)]
    perm = [2, 0, 3, 1]
    first = _run(PCD(primary="g0"), grams, names=["g0", "g1", "g2", "g3"])
    moved = _run(PCD(primary="g0"), [g[perm][:, perm] for g in grams], names=[f"g{i}" for i in perm])
    for w, v in zip(first, moved, strict=True):
        torch.testing.assert_close(v, w[perm], rtol=1e-12, atol=1e-14 * float(w.abs().max()))


def test_missing_primary_is_an_error_naming_it() -> None:
    plugin = PCD(primary="main")
    stats = GroupStats.from_gram(torch.eye(2, dtype=F64), ["a", "b"])
    with pytest.raises(PluginError, match=r"primary group 'main' is not among this step's groups \['a', 'b'\]"):
        plugin.update(stats, torch.ones(2, dtype=F64), plugin.init())


def test_ema_is_kept_per_group_name() -> None:
    """β-EMA of ‖g_i‖² per name with its own bias correction: a group absent from a step keeps its
    entries, a new group starts from zero (torchjd restarts everything when the count changes)."""
    beta = 0.5
    plugin = PCD(primary="a", beta=beta)
    state = plugin.init()
    steps = [(["a", "b", "c"], [1.0, 4.0, 9.0]), (["a", "c"], [2.0, 3.0]), (["c", "a", "d", "b"], [5.0, 1.0, 7.0, 6.0])]
    expected: dict[str, float] = {}
    for names, squares in steps:
        _, state = plugin.update(
            GroupStats.from_gram(torch.diag(torch.tensor(squares, dtype=F64)), names),
            torch.ones(len(names), dtype=F64),
            state,
        )
        for n, s in zip(names, squares, strict=True):
            expected[n] = beta * expected.get(n, 0.0) + (1 - beta) * s
    assert {n: float(v) for n, v in state["sq_norm_ema"].items()} == pytest.approx(expected, rel=1e-15)
    assert state["updates"] == {"a": 3, "b": 2, "c": 3, "d": 1}
    plugin.check_state(state)


def test_secondary_scale_does_not_matter() -> None:
    """Scaling a secondary gradient by the same constant at every step leaves the weights of the
    (unscaled) gradients as they were: the normalisation makes τ scale-free (ε = 0)."""
    gen = torch.Generator().manual_seed(8)
    rows = [_rows(3, gen) for _ in range(4)]
    scale = torch.tensor([1.0, 1e3, 1e-3], dtype=F64)
    plain = _run(PCD(primary="g0", eps=0.0, beta=0.9), [a @ a.T for a in rows])
    scaled = _run(PCD(primary="g0", eps=0.0, beta=0.9), [(scale[:, None] * a) @ (scale[:, None] * a).T for a in rows])
    for w, v in zip(plain, scaled, strict=True):
        torch.testing.assert_close(v * scale, w, rtol=1e-9, atol=1e-12 * float(w.abs().max()))


@pytest.mark.parametrize("k", [3, 5, 11])
def test_infeasible_constraints_leave_the_primary_gradient(k: int) -> None:
    """Opposite secondary gradients (τ > 0): no direction satisfies both, the update is g_1 itself;
    with τ = 0 the same problem is feasible and the secondary groups get weight."""
    a = torch.randn(k, 16, generator=torch.Generator().manual_seed(k), dtype=F64)
    a[2] = -2.0 * a[1]
    (w,) = _run(PCD(primary="g0"), [a @ a.T])
    torch.testing.assert_close(w, torch.eye(k, dtype=F64)[0], rtol=0, atol=1e-12)
    a[0] = 0.5 * a[0] - a[1]  # the primary conflicts with g_1 (and so agrees with g_2 = -2 g_1): g_1 needs weight
    (w,) = _run(PCD(primary="g0", tau=0.0), [a @ a.T])
    assert w[1] > 1e-3 and torch.isfinite(w).all()
    assert (a[1:] @ (w @ a) >= -1e-9 * a.norm(dim=1)[1:] * (w @ a).norm()).all()  # no secondary group gets worse
