"""modo (Chen et al. 2024): the simplex projection against its optimality conditions, the update against a
closed-form float64 reference for two groups and torchjd 0.18's MoDoWeighting over many steps (one sample and
split halves), its fixed point against MGDA's min-norm point, named state and a real model's update."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats, PluginError
from balancer.plugins import MoDo
from balancer.plugins.modo import project_onto_simplex
from balancer.recipes.split_half import half_groups

F64 = torch.float64


def _rows(k: int, n: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=gen, dtype=F64) * torch.logspace(-0.5, 0.5, k, dtype=F64)[:, None]


def _run(plugin: MoDo, sequence: list[torch.Tensor], names=None) -> list[torch.Tensor]:
    state, out = plugin.init(), []
    for t, a in enumerate(sequence):
        w, state = plugin.update(GroupStats.from_gram(a @ a.T, names, step=t), torch.ones(a.shape[0], dtype=F64), state)
        out.append(w)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_projection_meets_its_optimality_conditions(seed: int) -> None:
    """x = Π_Δ(y) iff x ≥ 0, Σx = 1, and y - x equals one θ on the support and is ≤ θ off it."""
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(k, generator=gen, dtype=F64) * 10.0 ** (seed - 2) for k in (1, 2, 5, 9)]
    cases += [torch.tensor([0.3, 0.3, 0.3, -2.0], dtype=F64), torch.tensor([1e30, -1e30, 0.0], dtype=F64)]
    for y in cases:
        x = project_onto_simplex(y)
        scale = y.abs().max().item() + 1.0
        assert (x >= 0).all() and abs(x.sum().item() - 1.0) <= 1e-14 * scale
        gap = y - x
        theta = gap[x > 0]
        torch.testing.assert_close(theta, theta.mean().expand_as(theta), rtol=0, atol=1e-14 * scale)
        assert (gap[x == 0] <= theta.mean() + 1e-14 * scale).all()


def _pair_projection(v: torch.Tensor) -> torch.Tensor:
    """Π_Δ for two entries in closed form: x_1 = clip((1 + v_1 - v_2) / 2, 0, 1)."""
    first = ((1.0 + v[0] - v[1]) / 2).clamp(0.0, 1.0)
    return torch.stack([first, 1.0 - first])


@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "rho": 0.0}, {"gamma": 0.02, "rho": 1.0}])
def test_two_groups_follow_the_papers_update(options: dict[str, float]) -> None:
    """λ ← Π_Δ(λ - γ (G λ + ρ λ)), written out for k = 2 over ten steps of changing gradients."""
    gamma, rho = options.get("gamma", 0.1), options.get("rho", 0.1)
    sequence = [_rows(2, seed=s) for s in range(10)]
    lam = torch.full((2,), 0.5, dtype=F64)
    for a, w in zip(sequence, _run(MoDo(**options), sequence), strict=True):
        lam = _pair_projection(lam - gamma * (a @ a.T @ lam + rho * lam))
        torch.testing.assert_close(w, lam, rtol=1e-13, atol=1e-15)


def test_fixed_point_is_the_min_norm_point() -> None:
    """With ρ = 0 and one fixed gradient pair, λ converges to MGDA's weights: for two groups
    λ_1 = clip(⟨g_2, g_2 - g_1⟩ / ‖g_1 - g_2‖², 0, 1)."""
    a = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]], dtype=F64)
    w = _run(MoDo(gamma=0.05, rho=0.0), [a] * 400)[-1]
    diff = a[0] - a[1]
    first = (a[1] @ (a[1] - a[0]) / (diff @ diff)).clamp(0.0, 1.0)
    torch.testing.assert_close(w, torch.stack([first, 1 - first]), rtol=1e-10, atol=1e-12)


def _halves(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(k, 7, generator=gen, dtype=F64)
    return tuple((mean + torch.randn(k, 7, generator=gen, dtype=F64)) / 2 for _ in range(2))  # type: ignore[return-value]


def _split_stats(a: torch.Tensor, b: torch.Tensor, tasks: list[str], step: int = 0) -> GroupStats:
    rows = torch.cat([a, b])
    names = [half_groups(t)[0] for t in tasks] + [half_groups(t)[1] for t in tasks]
    return GroupStats.from_gram(rows @ rows.T, names, step=step)


def test_split_half_uses_the_cross_matrix_and_gives_both_halves_the_task_weight() -> None:
    a, b = _halves(2, seed=3)
    w, state = MoDo(estimate="split_half").update(
        _split_stats(a, b, ["x", "y"]), torch.ones(4, dtype=F64), MoDo().init()
    )
    cross = 4 * a @ b.T
    lam = _pair_projection(torch.full((2,), 0.5, dtype=F64) - 0.1 * (cross @ torch.full((2,), 0.5, dtype=F64) + 0.05))
    torch.testing.assert_close(w, torch.cat([lam, lam]), rtol=1e-13, atol=1e-15)
    assert state["names"] == ["x", "y"]


def test_a_group_without_its_other_half_is_refused() -> None:
    stats = GroupStats.from_gram(torch.eye(3, dtype=F64), ["x/A", "x/B", "y/A"])
    with pytest.raises(PluginError, match=r"modo with estimate='split_half'.*\['y/A'\]"):
        MoDo(estimate="split_half").update(stats, torch.ones(3, dtype=F64), MoDo().init())


def test_new_group_starts_at_one_over_k_and_absent_group_keeps_its_weight() -> None:
    plugin, state = MoDo(gamma=0.3), MoDo().init()
    for t in range(3):
        rows = _rows(2, seed=t)
        _, state = plugin.update(GroupStats.from_gram(rows @ rows.T, ["a", "b"]), torch.ones(2, dtype=F64), state)
    kept_a, kept_b = state["weights"][0].clone(), state["weights"][1].clone()
    rows = _rows(2, seed=9)
    w, state = plugin.update(GroupStats.from_gram(rows @ rows.T, ["b", "c"]), torch.ones(2, dtype=F64), state)
    assert state["names"] == ["a", "b", "c"] and state["weights"][0] == kept_a
    start = torch.stack([kept_b, torch.tensor(0.5, dtype=F64)])
    expected = _pair_projection(start - 0.3 * (rows @ rows.T @ start + 0.1 * start))
    torch.testing.assert_close(w, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.anchors
@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "rho": 0.0}, {"gamma": 0.01, "rho": 2.0}])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_equals_torchjd_over_steps(torchjd_aggregation, options: dict[str, float], k: int) -> None:  # type: ignore[no-untyped-def]
    anchor = torchjd_aggregation.MoDoWeighting(**options)
    sequence = [_rows(k, seed=10 * k + t) for t in range(12)]
    for a, w in zip(sequence, _run(MoDo(**options), sequence), strict=True):
        torch.testing.assert_close(w, anchor(a @ a.T), rtol=1e-12, atol=1e-15)


@pytest.mark.anchors
@pytest.mark.parametrize("k", [1, 3])
def test_split_half_equals_torchjd_fed_two_independent_batches(torchjd_aggregation, k: int) -> None:  # type: ignore[no-untyped-def]
    """torchjd's two-batch example: G = J_1 J_2ᵀ with J_1, J_2 the two batches' mean gradients (2 g_A, 2 g_B)."""
    anchor, plugin = torchjd_aggregation.MoDoWeighting(gamma=0.3), MoDo(gamma=0.3, estimate="split_half")
    tasks, state = [f"t{i}" for i in range(k)], plugin.init()
    for t in range(10):
        a, b = _halves(k, seed=t)
        w, state = plugin.update(_split_stats(a, b, tasks, step=t), torch.ones(2 * k, dtype=F64), state)
        expected = anchor((2 * a) @ (2 * b).T)
        torch.testing.assert_close(w, torch.cat([expected, expected]), rtol=1e-12, atol=1e-15)


@pytest.mark.anchors
def test_real_model_update_is_lr_times_torchjd_weights(torchjd_aggregation, real_model_step) -> None:  # type: ignore[no-untyped-def]
    update, grads = real_model_step([("modo", {"gamma": 0.001})], 0.05)
    weights = torchjd_aggregation.MoDoWeighting(gamma=0.001)(grads @ grads.T)
    torch.testing.assert_close(update, 0.05 * weights @ grads, rtol=1e-9, atol=1e-12 * update.abs().max().item())


@pytest.mark.anchors
def test_large_gradients_stay_on_the_simplex_where_torchjd_returns_zeros(torchjd_aggregation) -> None:  # type: ignore[no-untyped-def]
    """Two orthogonal gradients of norm 1e9: λ - γ G λ is -5e16 in both entries; torchjd's projection rounds
    y - θ to 0 (weights all zero, no update); the shifted projection keeps the symmetric answer."""
    a = 1e9 * torch.eye(2, dtype=F64)
    assert torchjd_aggregation.MoDoWeighting()(a @ a.T).tolist() == [0.0, 0.0]
    assert _run(MoDo(), [a])[0].tolist() == [0.5, 0.5]
