"""pcgrad (Yu et al. 2020): the Gram-only loop equals Algorithm 1 on explicit gradient vectors,
torchjd 0.18 and LibMTL 1.1.5 (with their random orders reproduced), and a real model's update."""

from __future__ import annotations

import io
import random

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.plugins import PCGrad
from balancer.plugins._pairwise import to_gradient_weights, unit_cosines
from balancer.plugins._seeded import random_orders
from balancer.plugins.pcgrad import pcgrad_coefficients

F64 = torch.float64


def _reference(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 of the paper on the vectors: sequential projections, then the sum."""
    out = torch.zeros_like(grads[0])
    for i, order in enumerate(orders):
        edited = grads[i].clone()
        for j in order:
            dot = edited @ grads[j]
            if dot < 0:
                edited = edited - dot / (grads[j] @ grads[j]) * grads[j]
        out = out + edited
    return out


def _weights(grads: torch.Tensor, step: int = 0, seed: int = 0, incoming=None) -> torch.Tensor:
    k = grads.shape[0]
    stats = GroupStats.from_gram(grads @ grads.T, step=step)
    ones = torch.ones(k, dtype=F64) if incoming is None else incoming
    return PCGrad(seed=seed).update(stats, ones, {})[0]


def _with_orders(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    cosines, norms = unit_cosines(grads @ grads.T)
    order_t = torch.tensor(orders, dtype=torch.long).reshape(len(orders), -1)
    return to_gradient_weights(pcgrad_coefficients(cosines, order_t), norms)


def _close(direction, expected, grads, rtol=1e-9):
    """Relative to the expected direction, with a floor at rounding level of the gradients it combines
    (a direction that cancels to ~0 is compared absolutely; a wrong one is off by O(‖g‖))."""
    floor = 1e-13 * grads.norm(dim=1).max()
    assert (direction - expected).norm() <= rtol * expected.norm() + floor, (direction, expected)


def _cases():
    gen = torch.Generator().manual_seed(1)
    cases = {f"random{k}": torch.randn(k, 12, generator=gen, dtype=F64) for k in (2, 3, 5, 8)}
    low = torch.randn(5, 2, generator=gen, dtype=F64) @ torch.randn(2, 12, generator=gen, dtype=F64)
    cases["rank2"] = low
    base = torch.randn(3, 12, generator=gen, dtype=F64)
    cases["collinear"] = torch.stack([base[0], 3.0 * base[0], base[1]])
    cases["opposite"] = torch.stack([base[0], -0.5 * base[0], base[2]])
    cases["zero_row"] = torch.stack([base[0], torch.zeros(12, dtype=F64), base[1], base[2]])
    cases["all_zero"] = torch.zeros(3, 12, dtype=F64)
    cases["k1"] = base[:1]
    cases["badly_scaled"] = base * torch.tensor([[1e12], [1.0], [1e-12]], dtype=F64)
    cases["conflicting"] = torch.stack([base[0], -base[0] + 0.1 * base[1], -base[0] + 0.1 * base[2]])
    return cases


@pytest.mark.parametrize(("case", "grads"), list(_cases().items()))
@pytest.mark.parametrize("step", [0, 7])
def test_matches_algorithm_1_on_the_vectors(case, grads, step):
    names = tuple(f"g{i}" for i in range(grads.shape[0]))
    orders = random_orders(names, 0, step, "pcgrad", torch.device("cpu")).tolist()
    w = _weights(grads, step=step)
    assert torch.isfinite(w).all()
    _close(w @ grads, _reference(grads, orders), grads)


def test_incoming_weights_project_the_weighted_gradients():
    grads = _cases()["random3"]
    incoming = torch.tensor([2.0, -0.5, 0.0], dtype=F64)
    w = _weights(grads, incoming=incoming)
    orders = random_orders(("g0", "g1", "g2"), 0, 0, "pcgrad", torch.device("cpu")).tolist()
    _close(w @ grads, _reference(incoming[:, None] * grads, orders), incoming[:, None] * grads)
    assert w[2] == 0.0


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(4))
def test_equals_torchjd_with_the_same_orders(torchjd_aggregation, seed):
    """torchjd draws one ``torch.randperm(k)`` per gradient from the global RNG and skips ``j == i``."""
    grads = torch.randn(5, 20, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads[1] = -grads[0] + 0.3 * grads[1]  # make sure there are conflicts
    torch.manual_seed(seed)
    expected = torchjd_aggregation.PCGrad()(grads)
    torch.manual_seed(seed)
    perms = [torch.randperm(5).tolist() for _ in range(5)]
    orders = [[j for j in perm if j != i] for i, perm in enumerate(perms)]
    _close(_with_orders(grads, orders) @ grads, expected, grads, rtol=1e-5)


def _libmtl_pcgrad(libmtl, grads):
    method = libmtl.PCGrad()
    method.task_num, method.rep_grad = grads.shape[0], False
    method._compute_grad_dim = lambda: None
    method._compute_grad = lambda losses, mode: grads.clone()
    captured = []
    method._reset_grad = captured.append
    weights = method.backward([None] * grads.shape[0])
    return torch.as_tensor(weights, dtype=F64), captured[0]


@pytest.mark.anchors
@pytest.mark.parametrize("seed", range(4))
def test_equals_libmtl_with_the_same_orders(libmtl, seed):
    """LibMTL shuffles ``list(range(k))`` with Python's ``random`` per gradient and also visits ``i``
    itself; that visit projects nothing unless ``g_i^PC · g_i < 0``, which the reference checks."""
    grads = torch.randn(4, 20, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads[2] = -grads[0] + 0.2 * grads[2]
    random.seed(seed)
    lib_weights, lib_direction = _libmtl_pcgrad(libmtl, grads)
    random.seed(seed)
    shuffles = []
    for _ in range(4):
        order = list(range(4))
        random.shuffle(order)
        shuffles.append(order)
    _close(_reference(grads, shuffles), lib_direction, grads, rtol=1e-12)  # the self-visit changed nothing
    ours = _with_orders(grads, [[j for j in order if j != i] for i, order in enumerate(shuffles)])
    _close(ours @ grads, lib_direction, grads, rtol=1e-5)
    torch.testing.assert_close(ours, lib_weights, rtol=1e-5, atol=0)


@pytest.mark.anchors
def test_zero_gradient_is_finite_in_libmtl_and_here(libmtl):
    """The research notes list a zero gradient as LibMTL's NaN case; it is not one: a zero ``g_j``
    never has a negative dot product, so the unguarded division is never reached."""
    grads = torch.randn(3, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads[1] = 0.0
    random.seed(0)
    lib_weights, lib_direction = _libmtl_pcgrad(libmtl, grads)
    assert torch.isfinite(lib_weights).all()
    w = _weights(grads)
    assert w[1] == 1.0
    _close(w @ grads, lib_direction, grads)  # only one projection pair (0, 2) exists: order is irrelevant


def test_order_is_reproducible_and_follows_seed_and_step():
    names = tuple(f"task{i}" for i in range(6))
    cpu = torch.device("cpu")
    first = random_orders(names, 0, 3, "pcgrad", cpu)
    assert torch.equal(first, random_orders(names, 0, 3, "pcgrad", cpu))
    assert not torch.equal(first, random_orders(names, 0, 4, "pcgrad", cpu))
    assert not torch.equal(first, random_orders(names, 1, 3, "pcgrad", cpu))
    assert all(sorted(row) == [j for j in range(6) if j != i] for i, row in enumerate(first.tolist()))
    # permuting the groups permutes the orders: same pairs, by name
    reversed_rows = random_orders(names[::-1], 0, 3, "pcgrad", cpu).tolist()
    by_name = {names[i]: [names[j] for j in row] for i, row in enumerate(first.tolist())}
    assert {names[::-1][i]: [names[::-1][j] for j in row] for i, row in enumerate(reversed_rows)} == by_name


def test_orders_are_uniform():
    counts = torch.zeros(3, dtype=torch.long)
    for step in range(3000):
        first = random_orders(("a", "b", "c", "d"), 0, step, "pcgrad", torch.device("cpu"))[0, 0]
        counts[first - 1] += 1
    assert counts.min() > 900  # each of the 3 others comes first about 1000 times


def _model_losses(model, xs, scales):
    return {f"t{i}": model(x).pow(2).mean() * s for i, (x, s) in enumerate(zip(xs, scales, strict=True))}


def test_real_model_update_is_lr_times_the_reference_direction(group_gradients):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    xs = [torch.randn(6, 5, dtype=F64) for _ in range(3)]
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["pcgrad"])
    for step in range(3):
        losses = _model_losses(model, xs, [1.0, -20.0, 0.05])
        grads = group_gradients(losses.values(), model.parameters())
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        orders = random_orders(("t0", "t1", "t2"), 0, step, "pcgrad", torch.device("cpu")).tolist()
        _close(before - after, 0.1 * _reference(grads, orders), torch.cat([before[None], 0.1 * grads]), rtol=1e-10)


def test_order_reproducible_across_save_and_load():
    """Equal to rounding, not bit for bit: the core's first step after building a Balancer sums the
    Gram matrix over per-row blocks, later steps over one consolidated block (ulp differences)."""

    def run(resume_at, seed=5):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        xs = [torch.randn(6, 5, dtype=F64) for _ in range(4)]
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("pcgrad", {"seed": seed})])
        for step in range(5):
            if step == resume_at:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                model.load_state_dict(saved["model"])
                opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("pcgrad", {"seed": seed})])
                opt.load_state_dict(saved["opt"])
            opt.backward(_model_losses(model, xs, [1.0, -3.0, 0.5, -0.2]))
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    uninterrupted = run(resume_at=None)
    scale = uninterrupted.abs().max().item()  # ulp differences of the parameters: a floor at their scale
    torch.testing.assert_close(run(resume_at=2), uninterrupted, rtol=1e-12, atol=1e-14 * scale)
    assert (run(resume_at=None, seed=6) - uninterrupted).abs().max() > 1e-6  # another order shows


def test_mean_reduction_divides_by_k():
    grads = _cases()["random5"]
    stats = GroupStats.from_gram(grads @ grads.T)
    ones = torch.ones(5, dtype=F64)
    total = PCGrad().update(stats, ones, {})[0]
    torch.testing.assert_close(PCGrad(reduction="mean").update(stats, ones, {})[0], total / 5)
