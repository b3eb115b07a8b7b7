"""gradvac (Wang et al. 2021): the Gram-only loop equals the algorithm on explicit gradient vectors
over several steps, torchjd 0.18 (same orders, same targets) and LibMTL 1.1.5 (first step), and a
real model's update; targets follow the groups by name."""

from __future__ import annotations

import io
import random

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import GradVac
from balancer.plugins._pairwise import to_gradient_weights, unit_cosines
from balancer.plugins._seeded import random_orders
from balancer.plugins.gradvac import gradvac_coefficients

F64 = torch.float64
CPU = torch.device("cpu")


def _reference(grads, orders, targets, beta):
    """The algorithm on the vectors; pairs with a zero gradient are skipped (no edit, no EMA)."""
    targets = targets.clone()
    out = torch.zeros_like(grads[0])
    for i, order in enumerate(orders):
        edited = grads[i].clone()
        for j in order:
            ni, nj = edited.norm(), grads[j].norm()
            if ni == 0 or nj == 0:
                continue
            phi = (edited @ grads[j] / (ni * nj)).clamp(-1, 1)
            hat = targets[i, j]
            if phi < hat:
                root_phi, root_hat = (1 - phi**2).clamp_min(0).sqrt(), (1 - hat**2).sqrt()
                edited = edited + ni * (hat * root_phi - phi * root_hat) / (nj * root_hat) * grads[j]
            targets[i, j] = (1 - beta) * hat + beta * phi
        out = out + edited
    return out, targets


def _close(direction, expected, grads, rtol=1e-9):
    """Relative to the expected direction, with a floor at rounding level of the gradients it combines
    (a direction that cancels to ~0 is compared absolutely; a wrong one is off by O(‖g‖))."""
    floor = 1e-13 * grads.norm(dim=1).max()
    assert (direction - expected).norm() <= rtol * expected.norm() + floor, (direction, expected)


def _cases():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 15, generator=gen, dtype=F64)
    return {
        "random4": base,
        "rank2": torch.randn(5, 2, generator=gen, dtype=F64) @ torch.randn(2, 15, generator=gen, dtype=F64),
        "collinear": torch.stack([base[0], 2.0 * base[0], base[1]]),
        "opposite": torch.stack([base[0], -3.0 * base[0], base[1]]),
        "zero_row": torch.stack([base[0], torch.zeros(15, dtype=F64), base[2]]),
        "k1": base[:1],
        "badly_scaled": base[:3] * torch.tensor([[1e12], [1.0], [1e-12]], dtype=F64),
    }


@pytest.mark.parametrize(("case", "grads"), list(_cases().items()))
def test_matches_the_algorithm_on_vectors_over_steps(case, grads):
    plugin = GradVac(beta=0.3, eps=1e-300)
    k = grads.shape[0]
    names = tuple(f"g{i}" for i in range(k))
    state, targets = plugin.init(), torch.zeros(k, k, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        step_grads = grads * (1.0 + 0.3 * torch.rand(k, 1, generator=gen, dtype=F64)) + 0.05 * torch.randn(
            grads.shape, generator=gen, dtype=F64
        ) * grads.norm(dim=1, keepdim=True) * (grads.norm(dim=1, keepdim=True) > 0)
        stats = GroupStats.from_gram(step_grads @ step_grads.T, names, step=step)
        w, state = plugin.update(stats, torch.ones(k, dtype=F64), state)
        orders = random_orders(names, 0, step, "gradvac", CPU).tolist()
        expected, targets = _reference(step_grads, orders, targets, 0.3)
        assert torch.isfinite(w).all()
        _close(w @ step_grads, expected, step_grads)
        torch.testing.assert_close(state["targets"], targets, rtol=1e-9, atol=1e-12)


def _ours(grads, orders, targets, beta=0.5, eps=1e-8):
    cosines, norms = unit_cosines(grads @ grads.T)
    order_t = torch.tensor(orders, dtype=torch.long).reshape(len(orders), -1)
    coefficients, targets = gradvac_coefficients(cosines, targets, order_t, beta, eps)
    return to_gradient_weights(coefficients, norms), targets


@pytest.mark.anchors
def test_equals_torchjd_over_steps_with_the_same_orders(torchjd_aggregation):
    """torchjd draws ``torch.randperm(k-1)`` over the other groups, per group, from the global RNG."""
    k, aggregator = 4, torchjd_aggregation.GradVac(beta=0.5)
    targets = torch.zeros(k, k, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        grads = torch.randn(k, 30, generator=gen, dtype=F64)
        grads[1] = -grads[0] + 0.5 * grads[1]
        torch.manual_seed(step)
        expected = aggregator(grads)
        torch.manual_seed(step)
        orders = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            orders.append([others[p] for p in torch.randperm(k - 1).tolist()])
        weights, targets = _ours(grads, orders, targets)
        _close(weights @ grads, expected, grads, rtol=1e-5)
        torch.testing.assert_close(targets, aggregator.gramian_weighting._phi_t, rtol=1e-5, atol=1e-7)


def _libmtl_gradvac(libmtl, grads):
    method = libmtl.GradVac()
    method.task_num, method.rep_grad, method.device = grads.shape[0], False, grads.device
    method._compute_grad_dim = lambda: None
    method._compute_grad = lambda losses, mode: grads.clone()
    captured = []
    method._reset_grad = captured.append
    weights = method.backward([None] * grads.shape[0], beta=0.5)
    return method, torch.as_tensor(weights, dtype=F64), captured[0]


def _python_shuffles(k, seed):
    random.seed(seed)
    orders = []
    for i in range(k):
        order = [j for j in range(k) if j != i]
        random.shuffle(order)
        orders.append(order)
    return orders


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(3))
def test_first_step_equals_libmtl_and_its_targets_differ_by_design(libmtl, seed):
    """LibMTL 1.1.5 updates ``rho_T`` only for the pairs it edits (inside the ``if``); the paper
    and torchjd update every visited pair. The first step's direction is the same either way."""
    grads = torch.randn(4, 25, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads[2] = -grads[1] + 0.4 * grads[2]
    random.seed(seed)
    method, lib_weights, lib_direction = _libmtl_gradvac(libmtl, grads)
    orders = _python_shuffles(4, seed)
    weights, targets = _ours(grads, orders, torch.zeros(4, 4, dtype=F64))
    _close(weights @ grads, lib_direction, grads, rtol=1e-5)
    torch.testing.assert_close(weights, lib_weights, rtol=1e-5, atol=1e-8)
    edited = targets < 0  # with zero targets, exactly the pairs with a negative cosine are edited
    torch.testing.assert_close(
        method.rho_T.double()[edited], targets[edited], rtol=1e-6, atol=1e-7
    )  # float32 in LibMTL
    assert (method.rho_T[~edited] == 0).all() and (targets[~edited] > 0).any()


@pytest.mark.anchors
def test_exactly_opposite_gradients_nan_in_libmtl_finite_here(libmtl):
    """LibMTL: cos = -1 - ulp makes √(1 - cos²) NaN. Here cosines are clamped to [-1, 1]."""
    base = torch.randn(2, 9, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = torch.stack([base[0], -base[0], base[1]])
    random.seed(0)
    _, lib_weights, _ = _libmtl_gradvac(libmtl, grads)
    assert not torch.isfinite(lib_weights).all()
    stats = GroupStats.from_gram(grads @ grads.T)
    w, _ = GradVac().update(stats, torch.ones(3, dtype=F64), GradVac().init())
    assert torch.isfinite(w).all()


def test_targets_follow_group_names():
    grads = _cases()["random4"][:3]
    plugin = GradVac(beta=0.5)
    state = plugin.update(
        GroupStats.from_gram(grads @ grads.T, ("a", "b", "c")), torch.ones(3, dtype=F64), plugin.init()
    )[1]
    assert state["names"] == ["a", "b", "c"]
    perm = [2, 0, 1]
    permuted = GroupStats.from_gram((grads @ grads.T)[perm][:, perm], ("c", "a", "b"), step=1)
    straight = GroupStats.from_gram(grads @ grads.T, ("a", "b", "c"), step=1)
    w_perm, s_perm = plugin.update(permuted, torch.ones(3, dtype=F64), state)
    w_straight, s_straight = plugin.update(straight, torch.ones(3, dtype=F64), state)
    # A weight or a target may sit near 0: floors relative to the largest weight and to the cosines' scale (1).
    torch.testing.assert_close(w_perm, w_straight[perm], rtol=1e-12, atol=1e-12 * w_straight.abs().max().item())
    torch.testing.assert_close(s_perm["targets"], s_straight["targets"], rtol=1e-12, atol=1e-12)


def test_groups_appearing_and_disappearing():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(4, 10, generator=gen, dtype=F64)
    plugin = GradVac(beta=0.5)
    first = GroupStats.from_gram(grads[:3] @ grads[:3].T, ("a", "b", "c"))
    _, state = plugin.update(first, torch.ones(3, dtype=F64), plugin.init())
    before = state["targets"].clone()
    sub = grads[[0, 2]]
    _, state = plugin.update(GroupStats.from_gram(sub @ sub.T, ("a", "c"), step=1), torch.ones(2, dtype=F64), state)
    after = state["targets"]
    assert torch.equal(after[1], before[1]) and torch.equal(after[:, 1], before[:, 1])  # b untouched
    assert not torch.equal(after[0, 2], before[0, 2])  # a-c moved
    new = grads[[3, 0]]
    _, state = plugin.update(GroupStats.from_gram(new @ new.T, ("d", "a"), step=2), torch.ones(2, dtype=F64), state)
    assert state["names"] == ["a", "b", "c", "d"]
    assert state["targets"].shape == (4, 4)
    assert torch.equal(state["targets"][3, 1:3], torch.zeros(2, dtype=F64))  # d never met b, c: still 0


def _model_step_losses(model, xs):
    return {f"t{i}": model(x).pow(2).mean() * s for i, (x, s) in enumerate(zip(xs, [1.0, -4.0, 0.3], strict=True))}


def _build(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    return model, [torch.randn(6, 5, dtype=F64) for _ in range(3)]


def test_real_model_update_is_lr_times_the_reference_direction(group_gradients):
    model, xs = _build()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=[("gradvac", {"beta": 0.2, "eps": 1e-300})])
    names, targets = ("t0", "t1", "t2"), torch.zeros(3, 3, dtype=F64)
    params = list(model.parameters())
    for step in range(4):
        losses = _model_step_losses(model, xs)
        grads = group_gradients(losses.values(), params)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        orders = random_orders(names, 0, step, "gradvac", CPU).tolist()
        expected, targets = _reference(grads, orders, targets, 0.2)
        after = torch.cat([p.detach().reshape(-1) for p in params])
        _close(before - after, 0.05 * expected, torch.cat([before[None], 0.05 * grads]), rtol=1e-10)
    torch.testing.assert_close(opt.plugin_states["gradvac"]["targets"], targets, rtol=1e-9, atol=1e-12)


def test_state_round_trip_through_state_dict():
    def run(resume_at):
        model, xs = _build(1)
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=["gradvac"])
        for step in range(5):
            if step == resume_at:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=["gradvac"])
                opt.load_state_dict(torch.load(buffer, weights_only=True))
                assert opt.plugin_states["gradvac"]["names"] == ["t0", "t1", "t2"]
            opt.backward(_model_step_losses(model, xs))
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.plugin_states["gradvac"]

    (params_a, state_a), (params_b, state_b) = run(None), run(3)
    # The core's Gram: ulp-level only; the floors follow the parameters' scale and the cosines' (1).
    torch.testing.assert_close(params_b, params_a, rtol=1e-12, atol=1e-14 * params_a.abs().max().item())
    torch.testing.assert_close(state_b["targets"], state_a["targets"], rtol=1e-12, atol=1e-14)
