"""sdmgrad (Xiao et al. 2023): the inner iteration against a float64 reference written out for two groups, against
torchjd 0.18's SDMGradWeighting over many steps (one sample and split halves), its limits λ = 0 (MGDA's
min-norm point) and large λ (the mean), scale invariance where torchjd's floor freezes small gradients,
named state and a real model's update."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats
from balancer.plugins import SDMGrad
from balancer.recipes.split_half import half_groups

F64 = torch.float64


def _rows(k: int, n: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=gen, dtype=F64) * torch.logspace(-0.5, 0.5, k, dtype=F64)[:, None]


def _run(plugin: SDMGrad, grams: list[torch.Tensor], names=None) -> tuple[list[torch.Tensor], dict]:
    state, out = plugin.init(), []
    for t, gram in enumerate(grams):
        w, state = plugin.update(GroupStats.from_gram(gram, names, step=t), torch.ones(gram.shape[0], dtype=F64), state)
        out.append(w)
    return out, state


def _pair_projection(v: torch.Tensor) -> torch.Tensor:
    first = ((1.0 + v[0] - v[1]) / 2).clamp(0.0, 1.0)
    return torch.stack([first, 1.0 - first])


def _reference_pair(grams, lam=0.3, lr=10.0, momentum=0.5, iterations=20):
    """The paper's projected SGD on w (two groups, closed-form projection), with the official scaling s."""
    w, pref, out = torch.full((2,), 0.5, dtype=F64), torch.full((2,), 0.5, dtype=F64), []
    for gram in grams:
        s = gram.diagonal().clamp_min(0).sqrt().mean()
        a, v = gram / s**2, torch.zeros(2, dtype=F64)
        for _ in range(iterations):
            v = momentum * v + a @ (w + lam * pref)
            w = _pair_projection(w - lr * v)
        out.append((w + lam * pref) / (1 + lam))
    return out


@pytest.mark.parametrize(
    "options", [{}, {"lambda_": 0.0, "lr": 0.5}, {"lambda_": 2.0, "momentum": 0.0, "iterations": 3}]
)
def test_two_groups_follow_the_papers_iteration(options) -> None:
    grams = [_rows(2, seed=s) @ _rows(2, seed=s).T for s in range(8)]
    kwargs = {{"lambda_": "lam"}.get(key, key): value for key, value in options.items()}
    for w, expected in zip(_run(SDMGrad(**options), grams)[0], _reference_pair(grams, **kwargs), strict=True):
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-15)


def test_lambda_zero_reaches_the_min_norm_point_and_large_lambda_the_mean() -> None:
    a = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]], dtype=F64)
    diff = a[0] - a[1]
    first = (a[1] @ (a[1] - a[0]) / (diff @ diff)).clamp(0.0, 1.0)
    w = _run(SDMGrad(lambda_=0.0, lr=0.5), [a @ a.T] * 20)[0][-1]
    torch.testing.assert_close(w, torch.stack([first, 1 - first]), rtol=1e-10, atol=1e-12)
    far = _run(SDMGrad(lambda_=1e6), [a @ a.T])[0][0]
    torch.testing.assert_close(far, torch.full((2,), 0.5, dtype=F64), rtol=0, atol=1e-6)


def test_weights_do_not_depend_on_the_gradients_scale() -> None:
    grams = [_rows(3, seed=s) @ _rows(3, seed=s).T for s in range(5)]
    base = _run(SDMGrad(), grams)[0]
    for factor in (1e-12, 1e-5, 1e8):
        for w, expected in zip(_run(SDMGrad(), [factor**2 * g for g in grams])[0], base, strict=True):
            torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-12)


def test_zero_gradients_keep_the_weights() -> None:
    (w,), state = _run(SDMGrad(), [torch.zeros(3, 3, dtype=F64)])
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=F64))
    torch.testing.assert_close(state["weights"], torch.full((3,), 1 / 3, dtype=F64))


def test_new_group_starts_at_one_over_k_and_absent_group_keeps_its_weight() -> None:
    plugin = SDMGrad()
    _, state = _run(plugin, [_rows(2, seed=s) @ _rows(2, seed=s).T for s in range(3)], ["a", "b"])
    kept_a, kept_b = state["weights"][0].clone(), state["weights"][1].clone()
    rows = _rows(2, seed=9)
    _, state = plugin.update(GroupStats.from_gram(rows @ rows.T, ["b", "c"]), torch.ones(2, dtype=F64), state)
    assert state["names"] == ["a", "b", "c"] and state["weights"][0] == kept_a
    fresh = SDMGrad().init() | {"names": ["b", "c"], "weights": torch.stack([kept_b, torch.tensor(0.5, dtype=F64)])}
    _, expected = SDMGrad().update(GroupStats.from_gram(rows @ rows.T, ["b", "c"]), torch.ones(2, dtype=F64), fresh)
    torch.testing.assert_close(state["weights"][1:], expected["weights"], rtol=0, atol=0)


@pytest.mark.anchors
@pytest.mark.parametrize(
    "options", [{}, {"lambda_": 0.0, "lr": 0.5}, {"lambda_": 2.0, "momentum": 0.9, "iterations": 7, "lr": 1.0}]
)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_equals_torchjd_over_steps(torchjd_aggregation, options, k: int) -> None:  # type: ignore[no-untyped-def]
    """torchjd divides by s² + 1e-8 where the plugin divides by s²: at norms ~1e3 that is 1e-14 relative. The
    inner map with lr = 10 expands differences in the last bit (the projection's shift) to ~2e-7 by step 12."""
    anchor = torchjd_aggregation.SDMGradWeighting(
        **{{"iterations": "n_iter"}.get(key, key): value for key, value in options.items()}
    )
    grams = [1e6 * _rows(k, seed=10 * k + t) @ _rows(k, seed=10 * k + t).T for t in range(12)]
    for gram, w in zip(grams, _run(SDMGrad(**options), grams)[0], strict=True):
        torch.testing.assert_close(w, anchor(gram), rtol=1e-6, atol=1e-12)


@pytest.mark.anchors
def test_split_half_equals_torchjd_fed_two_independent_batches(torchjd_aggregation) -> None:  # type: ignore[no-untyped-def]
    anchor, plugin = torchjd_aggregation.SDMGradWeighting(), SDMGrad(estimate="split_half")
    tasks, state = ["x", "y", "z"], plugin.init()
    names = [half_groups(t)[0] for t in tasks] + [half_groups(t)[1] for t in tasks]
    gen = torch.Generator().manual_seed(5)
    for t in range(8):
        mean = 1e3 * torch.randn(3, 7, generator=gen, dtype=F64)
        a, b = ((mean + 1e3 * torch.randn(3, 7, generator=gen, dtype=F64)) / 2 for _ in range(2))
        rows = torch.cat([a, b])
        w, state = plugin.update(GroupStats.from_gram(rows @ rows.T, names, step=t), torch.ones(6, dtype=F64), state)
        expected = anchor((2 * a) @ (2 * b).T)
        torch.testing.assert_close(w, torch.cat([expected, expected]), rtol=1e-6, atol=1e-12)


@pytest.mark.anchors
def test_small_gradients_move_the_weights_where_torchjd_freezes_them(torchjd_aggregation) -> None:  # type: ignore[no-untyped-def]
    """Gradients of norm ~1e-7: torchjd's s² + 1e-8 is dominated by the floor, its steps are ~1e6 times
    shorter and the weights barely leave 1/k; the plugin's equal torchjd's at norm ~1."""
    rows = _rows(3, seed=4)
    small = 1e-7 * rows
    frozen = torchjd_aggregation.SDMGradWeighting()(small @ small.T)
    at_one = torchjd_aggregation.SDMGradWeighting()(rows @ rows.T)
    plugin = _run(SDMGrad(), [small @ small.T])[0][0]
    torch.testing.assert_close(plugin, at_one, rtol=1e-6, atol=1e-9)
    assert (frozen - 1 / 3).abs().max() < 0.1 * (at_one - 1 / 3).abs().max()


@pytest.mark.anchors
def test_real_model_update_is_lr_times_torchjd_weights(torchjd_aggregation, real_model_step) -> None:  # type: ignore[no-untyped-def]
    update, grads = real_model_step([("sdmgrad", {})], 0.05)
    weights = torchjd_aggregation.SDMGradWeighting()(grads @ grads.T)
    torch.testing.assert_close(update, 0.05 * weights @ grads, rtol=1e-6, atol=1e-9 * update.abs().max().item())
