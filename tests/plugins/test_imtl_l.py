"""imtl_l and imtl (Liu et al. 2021): learned loss scales against torch.optim on the paper's objective,
imtl against imtl_l followed by imtl_g and against LibMTL 1.1.5's IMTL."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats
from balancer.plugins import IMTL, IMTLG, IMTLL

F64 = torch.float64


def _problem(k: int = 3, steps: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, list[float]]]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.2, 1.0, 5.0, 2.0][:k], dtype=F64)
    out = []
    for _ in range(steps):
        rows = torch.randn(k, 7, generator=gen, dtype=F64) * scales[:, None]
        out.append((rows, (torch.rand(k, generator=gen, dtype=F64) * scales).tolist()))
    return out


def _run(plugin, problem):  # type: ignore[no-untyped-def]
    state, out = plugin.init(), []
    for rows, losses in problem:
        stats = GroupStats.from_gram(rows @ rows.T, losses=torch.tensor(losses, dtype=F64))
        w, state = plugin.update(stats, torch.ones(len(losses), dtype=F64), state)
        out.append(w)
    return out


@pytest.mark.parametrize(("rule", "lr"), [("adam", 0.05), ("sgd", 0.1)])
def test_imtl_l_equals_torch_optim_on_the_papers_objective(rule: str, lr: float) -> None:
    problem = _problem()
    s = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = torch.optim.Adam([s], lr=lr) if rule == "adam" else torch.optim.SGD([s], lr=lr)
    got = _run(IMTLL(lr=lr, optimizer=rule), problem)
    for (_, losses), w in zip(problem, got, strict=True):
        values = torch.tensor(losses, dtype=F64, requires_grad=True)
        objective = (s.exp() * values - s).sum()
        opt.zero_grad()
        objective.backward()
        torch.testing.assert_close(w, values.grad, rtol=1e-12, atol=0)  # the factors are ∂L/∂L_i before the step
        opt.step()
    assert not torch.allclose(got[0], got[-1])


def test_imtl_l_scales_every_loss_to_one() -> None:
    losses = [0.05, 1.0, 20.0]
    w = _run(IMTLL(lr=0.05), [(torch.eye(3, dtype=F64), losses)] * 800)[-1]
    torch.testing.assert_close(w * torch.tensor(losses, dtype=F64), torch.ones(3, dtype=F64), rtol=1e-3, atol=0)


def test_imtl_is_imtl_l_then_imtl_g() -> None:
    problem = _problem(k=4, seed=3)
    both = _run(IMTL(lr=0.05), problem)
    state, scaler = IMTLL(lr=0.05).init(), IMTLL(lr=0.05)
    for (rows, losses), w in zip(problem, both, strict=True):
        stats = GroupStats.from_gram(rows @ rows.T, losses=torch.tensor(losses, dtype=F64))
        scaled, state = scaler.update(stats, torch.ones(4, dtype=F64), state)
        expected, _ = IMTLG().update(stats, scaled, {})
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
        # impartial: the update has equal projections on the unit gradients
        d = w @ rows
        projections = rows @ d / rows.norm(dim=1)
        torch.testing.assert_close(projections, projections[:1].expand(4), rtol=1e-8, atol=0)


@pytest.mark.anchors
def test_imtl_equals_libmtl(libmtl) -> None:  # type: ignore[no-untyped-def]
    """LibMTL's IMTL returns IMTL-G's α of the scaled gradients; the update is Σ α_i exp(s_i) g_i."""
    problem = _problem(k=3, steps=6, seed=4)
    method = libmtl.IMTL()
    method.task_num, method.device, method.rep_grad = 3, torch.device("cpu"), False
    method.init_param()
    opt = torch.optim.Adam([method.loss_scale], lr=0.05)
    got = _run(IMTL(lr=0.05), problem)
    for (rows, losses), w in zip(problem, got, strict=True):
        scales = method.loss_scale.detach().exp().double()
        method._get_grads = lambda scaled, mode="backward", rows=rows: (
            scaled.sum().backward() or (method.loss_scale.detach().exp()[:, None] * rows.float())
        )
        method._backward_new_grads = lambda *args, **kwargs: None
        opt.zero_grad()
        alpha = torch.as_tensor(method.backward(torch.tensor(losses, requires_grad=True)), dtype=F64)
        opt.step()
        torch.testing.assert_close(w, alpha * scales, rtol=1e-4, atol=1e-6)
