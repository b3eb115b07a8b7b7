"""gls (Chennupati et al. 2019): the factors are the gradient of the geometric mean of the losses,
against autograd in float64 and LibMTL 1.1.5's GLS (whose reported weights are not its gradient)."""

from __future__ import annotations

import math

import pytest
import torch

from balancer import GroupStats
from balancer.plugins import GLS

F64 = torch.float64


def _weights(losses: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    plugin = GLS()
    k = len(losses)
    stats = GroupStats.from_gram(torch.eye(k, dtype=F64), losses=torch.tensor(losses, dtype=F64))
    return plugin.update(stats, torch.ones(k, dtype=F64), plugin.init())


def _geometric_mean_gradient(losses: list[float]) -> torch.Tensor:
    values = torch.tensor(losses, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(values.prod() ** (1.0 / len(losses)), values)
    return grad


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_factors_are_the_gradient_of_the_geometric_mean(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    losses = (torch.rand(k, generator=gen, dtype=F64) * 4 + 0.01).tolist()
    w, state = _weights(losses)
    torch.testing.assert_close(w, _geometric_mean_gradient(losses), rtol=1e-12, atol=0)
    assert state["undefined"].item() == 0.0


def test_finite_where_the_product_overflows() -> None:
    losses = [1e200, 1e200, 1e-200, 1e150]
    w, _ = _weights(losses)
    log_gm = sum(math.log(v) for v in losses) / 4
    expected = torch.tensor([math.exp(log_gm - math.log(v)) / 4 for v in losses], dtype=F64)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_undefined_geometric_mean_falls_back_to_the_mean_and_says_so(bad: float) -> None:
    w, state = _weights([0.5, bad, 2.0])
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=F64))
    assert state["undefined"].item() == 1.0 and GLS().metrics(state)["undefined"].item() == 1.0


@pytest.mark.anchors
def test_equals_the_gradient_libmtl_backpropagates_not_the_weights_it_reports(libmtl) -> None:  # type: ignore[no-untyped-def]
    losses = [0.7, 1.9, 0.2]
    method = libmtl.GLS()
    method.task_num, method.device = 3, torch.device("cpu")
    values = torch.tensor(losses, dtype=F64, requires_grad=True)
    reported = torch.as_tensor(method.backward(values), dtype=F64)
    w, _ = _weights(losses)
    torch.testing.assert_close(w, values.grad, rtol=1e-12, atol=0)  # what LibMTL's backward applies
    assert not torch.allclose(reported, w, rtol=1e-3)  # LibMTL reports L_i / (K Π L), not the gradient
    torch.testing.assert_close(reported, torch.tensor(losses, dtype=F64) / (3 * math.prod(losses)))
