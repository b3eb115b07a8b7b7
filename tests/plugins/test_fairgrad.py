"""fairgrad (Ban & Ji 2024): the weights solve G x = x^(-1/α) (eq. 4) to float64 rounding, equal torchjd 0.18's
FairGrad, reduce to the mean at α = 0 and to Nash-MTL's condition at α = 1; degenerate cases stay finite."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats
from balancer.plugins import FairGrad, NashMTL

F64 = torch.float64


def _rows(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, 12, generator=gen, dtype=F64) * torch.logspace(-1, 1, k, dtype=F64)[:, None]


def _weights(rows: torch.Tensor, **options: float) -> torch.Tensor:
    plugin = FairGrad(**options)
    w, _ = plugin.update(GroupStats.from_gram(rows @ rows.T), torch.ones(rows.shape[0], dtype=F64), plugin.init())
    return w


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_weights_solve_the_papers_equation(alpha: float, k: int) -> None:
    rows = _rows(k, seed=k)
    x = _weights(rows, alpha=alpha)
    assert (x > 0).all()
    torch.testing.assert_close(rows @ rows.T @ x, x.pow(-1.0 / alpha), rtol=1e-10, atol=0)


def test_alpha_zero_is_the_mean_and_alpha_one_is_nash_bargaining() -> None:
    rows = _rows(4, seed=7)
    assert _weights(rows, alpha=0.0).tolist() == [0.25] * 4
    x = _weights(rows, alpha=1.0)
    torch.testing.assert_close(rows @ rows.T @ x, 1.0 / x, rtol=1e-10, atol=0)  # G x = 1/x: Nash-MTL's condition
    nash = NashMTL(max_norm=0.0, optim_niter=100)
    w, _ = nash.update(GroupStats.from_gram(rows @ rows.T), torch.ones(4, dtype=F64), nash.init())
    torch.testing.assert_close(w, x, rtol=1e-4, atol=0)  # Nash-MTL solves the same condition iteratively


def test_larger_alpha_favours_the_worst_off_group() -> None:
    """The rates of improvement g_iᵀd = x_i^(-1/α) become more equal as α grows (max-min fairness in the limit)."""
    rows = _rows(4, seed=2)
    spreads = []
    for alpha in (0.5, 1.0, 2.0, 8.0):
        rates = rows @ (_weights(rows, alpha=alpha) @ rows)
        spreads.append((rates.max() / rates.min()).item())
    assert spreads == sorted(spreads, reverse=True) and spreads[-1] < spreads[0]


def test_zero_and_dependent_gradients_stay_finite() -> None:
    rows = _rows(3, seed=4)
    rows[1] = 0.0
    x = _weights(rows, alpha=2.0)
    assert x[1] == 0.0 and torch.isfinite(x).all()
    kept = rows[[0, 2]]
    torch.testing.assert_close(x[[0, 2]], _weights(kept, alpha=2.0), rtol=1e-10, atol=0)  # the others as without it
    dependent = torch.cat([rows[:1], 2 * rows[:1], rows[2:]])
    assert torch.isfinite(_weights(dependent, alpha=1.0)).all()


@pytest.mark.anchors
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_equals_torchjd(torchjd_aggregation, alpha: float, k: int) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("scipy")
    rows = _rows(k, seed=30 + k)
    expected = torchjd_aggregation.FairGrad(alpha=alpha)(rows)
    torch.testing.assert_close(_weights(rows, alpha=alpha) @ rows, expected, rtol=1e-6, atol=1e-9)
