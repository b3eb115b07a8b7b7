"""config (ConFIG, Liu et al. 2025) and krum (Blanchard et al. 2017) from the Gram matrix, against the
papers' definitions on explicit vectors (float64) and torchjd 0.18; krum's group-count refusal."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GroupStats
from balancer.errors import PluginError
from balancer.plugins import ConFIG, Krum

F64 = torch.float64


def _weights(plugin, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    stats = GroupStats.from_gram(rows @ rows.T)
    w, _ = plugin.update(stats, torch.ones(rows.shape[0], dtype=F64), plugin.init())
    return w


def _rows(k: int, n: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, k, dtype=F64)
    return torch.randn(k, n, generator=gen, dtype=F64) * scales[:, None]


def _config_reference(rows: torch.Tensor) -> torch.Tensor:
    """Eq. 2 on the explicit vectors: b = pinv(U) 1, t = b/‖b‖, d = (Σ_j g_jᵀ t) t."""
    units = rows / rows.norm(dim=1, keepdim=True)
    b = torch.linalg.pinv(units) @ torch.ones(rows.shape[0], dtype=F64)
    t = b / b.norm()
    return (rows @ t).sum() * t


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_config_equals_the_papers_direction(k: int) -> None:
    rows = _rows(k, seed=k)
    d = _weights(ConFIG(), rows) @ rows
    expected = _config_reference(rows)
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-12 * expected.norm().item())
    cosines = rows @ d / (rows.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines, cosines[:1].expand(k), rtol=1e-9, atol=0)  # equal cosines: conflict-free


def test_config_zero_gradient_gets_no_weight() -> None:
    rows = _rows(3)
    rows[1] = 0.0
    w = _weights(ConFIG(), rows)
    assert w[1] == 0.0 and torch.isfinite(w).all()
    torch.testing.assert_close(w @ rows, _config_reference(rows[[0, 2]]), rtol=1e-9, atol=0)
    assert _weights(ConFIG(), torch.zeros(2, 4, dtype=F64)).tolist() == [0.0, 0.0]


@pytest.mark.anchors
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_config_equals_torchjd(torchjd_aggregation, k: int) -> None:  # type: ignore[no-untyped-def]
    rows = _rows(k, seed=10 + k)
    expected = torchjd_aggregation.ConFIG()(rows)
    torch.testing.assert_close(_weights(ConFIG(), rows) @ rows, expected, rtol=1e-9, atol=1e-12)


def _krum_reference(rows: torch.Tensor, f: int, m: int, squared: bool) -> torch.Tensor:
    """Scores on explicit vectors: sum of the (squared, as in the paper) distances to the k - f - 2 nearest."""
    k = rows.shape[0]
    distances = torch.cdist(rows, rows) ** (2 if squared else 1)
    scores = torch.stack([distances[i][torch.arange(k) != i].sort().values[: k - f - 2].sum() for i in range(k)])
    weights = torch.zeros(k, dtype=F64)
    weights[scores.argsort()[:m]] = 1.0 / m
    return weights


@pytest.mark.parametrize(("k", "f", "m"), [(5, 0, 1), (6, 1, 1), (8, 2, 3), (9, 1, 4)])
def test_krum_selects_like_the_definition(k: int, f: int, m: int) -> None:
    rows = torch.randn(k, 9, generator=torch.Generator().manual_seed(k + f), dtype=F64)
    rows[0] += 100.0  # an outlier, never selected
    w = _weights(Krum(n_byzantine=f, n_selected=m), rows)
    torch.testing.assert_close(w, _krum_reference(rows, f, m, squared=False), rtol=0, atol=0)
    assert w[0] == 0.0 and w.sum().item() == pytest.approx(1.0)


def test_krum_euclidean_and_squared_scores_can_disagree_and_the_docs_say_which() -> None:
    """torchjd (and this plugin) sum distances; the paper sums squared distances. Found by search."""
    for seed in range(200):
        rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
        euclid, squared = (_krum_reference(rows, 0, 1, s) for s in (False, True))
        if not torch.equal(euclid, squared):
            torch.testing.assert_close(_weights(Krum(), rows), euclid, rtol=0, atol=0)
            return
    pytest.fail("no disagreement found")


@pytest.mark.anchors
@pytest.mark.parametrize(("k", "f", "m"), [(5, 0, 1), (7, 2, 2), (10, 3, 4)])
def test_krum_equals_torchjd(torchjd_aggregation, k: int, f: int, m: int) -> None:  # type: ignore[no-untyped-def]
    rows = _rows(k, seed=20 + k)
    expected = torchjd_aggregation.Krum(n_byzantine=f, n_selected=m)(rows)
    torch.testing.assert_close(_weights(Krum(n_byzantine=f, n_selected=m), rows) @ rows, expected, rtol=1e-12, atol=0)


def test_krum_refuses_too_few_groups_in_a_balancer() -> None:
    model = torch.nn.Linear(2, 1)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("krum", {"n_byzantine": 1})])
    assert opt.plugins[0].min_groups == 4
    x = torch.randn(4, 2)
    opt.backward({f"worker{i}": model(x[i : i + 1]).pow(2).sum() for i in range(3)})
    with pytest.raises(PluginError, match=r"n_byzantine \+ 3 = 4 .* this step has 3"):
        opt.step()
