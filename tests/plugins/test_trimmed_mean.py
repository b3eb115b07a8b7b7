"""``trimmed_mean``: equal to torchjd 0.18's ``TrimmedMean`` in float64 (random, tied, zero and
spread rows, every trim number), to an explicit per-coordinate reference of Yin et al.'s
definition, and refusing too few groups where torchjd raises."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats, PluginError
from balancer.contract.combine import Columns
from balancer.plugins.trimmed_mean import TrimmedMean

F64 = torch.float64


def _combine(rule: TrimmedMean, rows: torch.Tensor) -> torch.Tensor:
    stats = GroupStats.from_gram(rows @ rows.T)
    weights, state = rule.update(stats, torch.ones(rows.shape[0], dtype=F64), rule.init())
    assert torch.equal(weights, torch.ones_like(weights))
    zero = torch.zeros(1, dtype=torch.int64)
    return rule.combine(rows, Columns(0, rows.shape[1], zero, zero), state)


def _cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        f"random k={k}": torch.randn(k, 300, generator=gen, dtype=F64) for k in (1, 3, 4, 5, 8, 20)
    }  # 20: torch.sort
    tied = torch.randint(-2, 3, (6, 300), generator=gen).to(F64)  # many equal values per column
    out["ties"] = tied
    out["zero rows"] = torch.cat([torch.zeros(2, 300, dtype=F64), torch.randn(3, 300, generator=gen, dtype=F64)])
    out["spread"] = torch.randn(7, 300, generator=gen, dtype=F64) * torch.logspace(-12, 12, 7, dtype=F64)[:, None]
    byzantine = torch.randn(5, 300, generator=gen, dtype=F64)
    byzantine[0] = 1e8  # one attacker far out: trimmed away
    out["byzantine"] = byzantine
    return out


@pytest.mark.anchors
@pytest.mark.parametrize("case", list(_cases()))
def test_equals_torchjd(case, torchjd_aggregation):
    rows = _cases()[case]
    for b in range((rows.shape[0] - 1) // 2 + 1):
        expected = torchjd_aggregation.TrimmedMean(trim_number=b)(rows)
        ours = _combine(TrimmedMean(trim_number=b), rows)
        scale = float(rows.abs().max())
        torch.testing.assert_close(ours, expected, rtol=1e-15, atol=1e-15 * scale)


@pytest.mark.anchors
def test_too_few_groups_is_refused_like_torchjd(torchjd_aggregation):
    rows = torch.randn(4, 10, dtype=F64)
    with pytest.raises(ValueError, match="at least 5 rows"):
        torchjd_aggregation.TrimmedMean(trim_number=2)(rows)
    with pytest.raises(PluginError, match="at least 5 groups"):
        _combine(TrimmedMean(trim_number=2), rows)


def test_equals_the_definition_per_coordinate():
    rows = _cases()["ties"]
    b, k = 2, rows.shape[0]
    expected = torch.tensor([sum(sorted(rows[:, j].tolist())[b : k - b]) / (k - b - b) for j in range(rows.shape[1])])
    torch.testing.assert_close(_combine(TrimmedMean(trim_number=b), rows), expected.to(F64), rtol=1e-15, atol=1e-15)
    assert not torch.allclose(expected.to(F64), rows.mean(0))  # trimming changes the mean here


def test_attacker_does_not_move_the_update():
    rows = _cases()["byzantine"]
    honest = _combine(TrimmedMean(trim_number=1), rows)
    assert float(honest.abs().max()) < 5.0  # the 1e8 row is gone
    assert float(rows.mean(0).abs().min()) > 1e7  # the plain mean is dragged away
