"""Split-half groups: the estimator is unbiased where the naive norm is not; pooling and SplitHalf."""

from __future__ import annotations

import math

import pytest
import torch

from balancer import Balancer, GroupStats, StateDictError
from balancer.contract.testing import check_plugin
from balancer.recipes.split_half import SplitHalf, half_groups, pool_halves, split_half_sq_norms, task_layout


def test_split_half_estimate_is_unbiased_and_the_naive_norm_is_not():
    """ℓ_i(θ) = ½‖θ − x_i‖² with x_i ~ N(μ, σ²I): the true gradient θ − μ is known, and the naive
    ‖ĝ‖² of an n-sample batch overshoots ‖θ − μ‖² by dσ²/n. Both estimators go through the
    Balancer's Gram matrix; the tolerance is 4 standard errors of the mean over the draws."""
    d, n, sigma, draws = 4, 8, 1.5, 800
    gen = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64))
    mu = torch.tensor([0.5, -1.0, 0.5, 1.0], dtype=torch.float64)
    true_sq = float((theta.detach() - mu).square().sum())
    opt = Balancer(torch.optim.SGD([theta], lr=0.0))
    split, naive = [], []
    for _ in range(draws):
        x = mu + sigma * torch.randn(n, d, generator=gen, dtype=torch.float64)
        per_sample = 0.5 * (theta - x).square().sum(dim=1)
        loss_a, loss_b = per_sample[: n // 2].sum() / n, per_sample[n // 2 :].sum() / n
        opt.backward(dict(zip(half_groups("t"), (loss_a, loss_b), strict=True)))
        opt.step()
        opt.zero_grad()
        split.append(float(split_half_sq_norms(opt.last_stats)[0]))
        naive.append(float(pool_halves(opt.last_stats).sq_norms[0]))
    split_t, naive_t = torch.tensor(split), torch.tensor(naive)
    split_se, naive_se = split_t.std() / math.sqrt(draws), naive_t.std() / math.sqrt(draws)

    assert abs(float(split_t.mean()) - true_sq) < 4 * split_se
    bias = d * sigma**2 / n
    assert float(naive_t.mean()) > true_sq + bias / 2
    assert abs(float(naive_t.mean()) - (true_sq + bias)) < 4 * naive_se


def _stats(names, seed=0):
    rows = torch.randn(len(names), 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return rows, GroupStats.from_gram(rows @ rows.T, names, losses=[float(i) for i in range(len(names))])


def test_pool_halves_sums_each_tasks_halves():
    rows, stats = _stats(["a/A", "u", "a/B", "b/A", "b/B", "c/A"])
    pooled = pool_halves(stats)

    assert pooled.names == ("a", "u", "b", "c/A")  # c/A has no partner: a task of its own
    task_rows = torch.stack([rows[0] + rows[2], rows[1], rows[3] + rows[4], rows[5]])
    torch.testing.assert_close(pooled.gram, task_rows @ task_rows.T)
    assert pooled.losses.tolist() == [2.0, 1.0, 7.0, 5.0]
    estimate = split_half_sq_norms(stats)
    torch.testing.assert_close(estimate[[0, 2]], 4 * torch.stack([rows[0] @ rows[2], rows[3] @ rows[4]]))
    assert torch.isnan(estimate[[1, 3]]).all()


def test_a_group_named_like_a_pooled_task_is_refused():
    with pytest.raises(ValueError, match="Group `a` and its halves `a/A`, `a/B` are in the same step"):
        task_layout(["a", "a/A", "a/B"])


def test_split_half_task_norm_weighs_tasks_and_gives_halves_their_tasks_weight():
    rows, stats = _stats(["a/A", "a/B", "b/A", "b/B", "u"], seed=1)
    rows[2:4] *= 30.0  # task b: 30x larger gradients
    stats = GroupStats.from_gram(rows @ rows.T, stats.names)
    plugin = SplitHalf(["task_norm"])

    weights, state = plugin.update(stats, torch.ones(5, dtype=torch.float64), plugin.init())

    assert weights[0] == weights[1] and weights[2] == weights[3]
    tasks = [rows[0] + rows[1], rows[2] + rows[3], rows[4]]
    contributions = torch.stack([(w * g).norm() for w, g in zip(weights[[0, 2, 4]], tasks, strict=True)])
    torch.testing.assert_close(contributions, contributions.mean().expand(3))
    assert set(state) == {"task_norm"}


def test_split_half_conforms_and_with_no_plugins_gives_ones():
    check_plugin(SplitHalf([("task_norm", {"beta": 0.5})]))
    _, stats = _stats(["a/A", "a/B", "b"])
    weights, _ = SplitHalf().update(stats, torch.ones(3, dtype=torch.float64), {})
    assert weights.tolist() == [1.0, 1.0, 1.0]


def test_split_half_in_a_balancer_checkpoints_its_inner_state():
    model = torch.nn.Linear(3, 1)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[SplitHalf([("task_norm", {"beta": 0.5})])])
    x = torch.randn(4, 3)
    opt.backward({"a/A": model(x[:2]).sum(), "a/B": model(x[2:]).sum(), "b": 10 * model(x).square().sum()})
    opt.step()

    saved = opt.state_dict()["balancer"]["states"]["split_half"]["task_norm"]
    assert sorted(saved["ema_norms"]) == ["a", "b"]

    state = opt.state_dict()
    state["balancer"]["states"]["split_half"]["task_norm"]["ema_norms"]["a"] = torch.tensor(float("nan"))
    with pytest.raises(StateDictError, match=r"split_half\.task_norm\.ema_norms\.a: found nan"):
        opt.load_state_dict(state)
    state["balancer"]["states"]["split_half"] = {"upgrad": {}}
    with pytest.raises(StateDictError, match=r"one entry per inner plugin \['task_norm'\]"):
        opt.load_state_dict(state)
