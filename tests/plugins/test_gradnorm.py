"""gradnorm (Chen et al. 2018): learned weights against a float64 autograd reference of the paper's
L_grad (both parametrisations), against LibMTL 1.1.5's GradNorm, and its first-step and naming rules."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats
from balancer.plugins import GradNorm

F64 = torch.float64


def _problem(k: int = 3, steps: int = 8, n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, list[float]]]:
    """Per step: gradient rows [k, n] of different scales and losses that fall at different rates."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.3, 1.0, 4.0, 2.0, 0.7][:k], dtype=F64)
    out = []
    for t in range(steps):
        rows = torch.randn(k, n, generator=gen, dtype=F64) * scales[:, None]
        losses = (torch.rand(k, generator=gen, dtype=F64) * 0.2 + 1.0) * torch.exp(-t * scales / 10)
        out.append((rows, losses.tolist()))
    return out


def _run(plugin: GradNorm, problem: list[tuple[torch.Tensor, list[float]]]) -> list[torch.Tensor]:
    state, out = plugin.init(), []
    for rows, losses in problem:
        stats = GroupStats.from_gram(rows @ rows.T, losses=torch.tensor(losses, dtype=F64))
        w, state = plugin.update(stats, torch.ones(len(losses), dtype=F64), state)
        out.append(w)
    return out


def _reference(problem, alpha: float, lr: float, parametrization: str, rule: str) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The paper's L_grad differentiated by autograd, the parameter stepped by torch.optim; L(0) = first loss."""
    k = problem[0][0].shape[0]
    p = torch.nn.Parameter(torch.zeros(k, dtype=F64) if parametrization == "softmax" else torch.ones(k, dtype=F64))
    opt = torch.optim.Adam([p], lr=lr) if rule == "adam" else torch.optim.SGD([p], lr=lr)
    initial, out = None, []
    for rows, losses in problem:
        w = k * torch.softmax(p, 0) if parametrization == "softmax" else p * 1.0  # direct: p sums to k
        out.append(w.detach().clone())
        if initial is None:
            initial = torch.tensor(losses, dtype=F64)
            continue
        ratio = torch.tensor(losses, dtype=F64) / initial
        rate = ratio / ratio.mean()
        g = w * rows.norm(dim=1)  # G_i = w_i ‖g_i‖ for w ≥ 0 (the norm of w_i g_i has no slope at w_i = 0)
        l_grad = (g - (g.mean() * rate**alpha).detach()).abs().sum()
        opt.zero_grad()
        l_grad.backward()
        opt.step()
        if parametrization == "direct":
            with torch.no_grad():
                p.clamp_(min=0.0)
                p.mul_(k / p.sum())
    return out


@pytest.mark.parametrize(
    ("parametrization", "rule", "alpha", "lr"),
    [
        ("softmax", "adam", 1.5, 0.05),
        ("softmax", "sgd", 0.5, 0.3),
        ("direct", "sgd", 1.5, 0.05),
        ("direct", "adam", 0.0, 0.02),
    ],
)
def test_equals_autograd_on_the_papers_objective(parametrization: str, rule: str, alpha: float, lr: float) -> None:
    problem = _problem()
    plugin = GradNorm(alpha=alpha, lr=lr, parametrization=parametrization, optimizer=rule)
    got = _run(plugin, problem)
    expected = _reference(problem, alpha, lr, parametrization, rule)
    for w, e in zip(got, expected, strict=True):
        torch.testing.assert_close(w, e, rtol=1e-10, atol=1e-12)
    assert got[0].tolist() == [1.0, 1.0, 1.0] and got[1].tolist() == [1.0, 1.0, 1.0]  # L(0) first, then learn
    assert not torch.allclose(got[-1], got[0])
    torch.testing.assert_close(got[-1].sum(), torch.tensor(3.0, dtype=F64))


def test_pulls_the_slow_group_up() -> None:
    """Equal gradient norms, one group whose loss does not fall: its weight grows, the others' shrink."""
    rows = torch.eye(3, dtype=F64)
    problem = [(rows, [1.0, 0.9**t, 0.9**t]) for t in range(40)]
    w = _run(GradNorm(lr=0.05), problem)[-1]
    assert w[0] > 1.2 and w[1] < 1.0 and w[2] < 1.0


@pytest.mark.anchors
def test_equals_libmtl_gradnorm_with_one_epoch_per_step(libmtl) -> None:  # type: ignore[no-untyped-def]
    """LibMTL's epoch e is step e here: epoch 0 weighs equally and fills L(0); then s takes Adam steps."""
    problem = _problem(k=3, steps=7, seed=2)
    method = libmtl.GradNorm()
    method.task_num, method.device, method.rep_grad = 3, torch.device("cpu"), False
    method.init_param()
    method.loss_scale.data.zero_()  # LibMTL starts s at 1 for every task; the softmax is the same
    method.train_loss_buffer = torch.tensor([problem[0][1]], dtype=torch.float32).T.numpy()
    opt = torch.optim.Adam([method.loss_scale], lr=1e-2)
    got = _run(GradNorm(lr=1e-2), problem)
    for epoch, ((rows, losses), w) in enumerate(zip(problem, got, strict=True)):
        method.epoch = epoch
        method._get_grads = lambda losses, mode="backward", rows=rows: rows.float()
        method._backward_new_grads = lambda *args, **kwargs: None
        opt.zero_grad()
        values = torch.tensor(losses, dtype=torch.float32, requires_grad=True)
        expected = method.backward(values, alpha=1.5)
        opt.step()
        torch.testing.assert_close(w, torch.as_tensor(expected, dtype=F64), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[-1], got[0])


def test_unknown_loss_skips_learning_and_new_groups_start_at_the_mean() -> None:
    plugin = GradNorm(lr=0.1, optimizer="sgd")
    problem = _problem(k=2, steps=3)
    state = plugin.init()
    for rows, losses in problem:
        _, state = plugin.update(
            GroupStats.from_gram(rows @ rows.T, ("a", "b"), losses=torch.tensor(losses, dtype=F64)),
            torch.ones(2, dtype=F64), state,
        )  # fmt: skip
    rows = problem[0][0]
    before = state["params"].clone()
    w, state = plugin.update(
        GroupStats.from_gram(rows @ rows.T, ("a", "b"), losses=torch.tensor([float("nan"), 1.0], dtype=F64)),
        torch.ones(2, dtype=F64), state,
    )  # fmt: skip
    assert torch.equal(state["params"], before)  # no ratio without a's loss: no step
    torch.testing.assert_close(w, 2 * torch.softmax(before, 0))
    rows3 = torch.randn(3, 4, dtype=F64)
    w, state = plugin.update(
        GroupStats.from_gram(rows3 @ rows3.T, ("c", "a", "b"), losses=torch.ones(3, dtype=F64)),
        torch.ones(3, dtype=F64), state,
    )  # fmt: skip
    assert state["names"] == ["a", "b", "c"]
    s = torch.cat([before.mean().reshape(1), before])  # c starts at the mean of a's and b's s
    torch.testing.assert_close(w, 3 * torch.softmax(s, 0))
    assert torch.isnan(state["initial_loss"]).sum() == 0 and state["initial_loss"][2] == 1.0
