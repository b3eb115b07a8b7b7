"""``graddrop``: equal to torchjd 0.18's ``GradDrop`` and LibMTL 1.1.5's ``GradDrop`` when their
``torch.rand``/``torch.rand_like`` are made to return our counter-based draws (float64, random and
adversarial rows, leaks), the deterministic limits P ∈ {0, 1}, and the distribution of the draws:
each sign survives with its purity's probability."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from balancer import GroupStats
from balancer.contract.combine import Columns, counter_uniform
from balancer.plugins.graddrop import GradDrop

F64 = torch.float64
START = (1 << 32) + 77  # a global offset past 2**32


def _columns(n: int, start: int = START) -> Columns:
    return Columns(0, n, torch.zeros(1, dtype=torch.int64), torch.tensor([start]))


def _combine(rule: GradDrop, rows: torch.Tensor, step: int = 3, names=None) -> torch.Tensor:
    names = names or [f"t{i}" for i in range(rows.shape[0])]
    stats = GroupStats.from_gram(rows @ rows.T, names, step=step)
    _, state = rule.update(stats, torch.ones(rows.shape[0], dtype=F64), rule.init())
    return rule.combine(rows, _columns(rows.shape[1]), state)


def _draws(rule: GradDrop, n: int, step: int = 3) -> torch.Tensor:
    return counter_uniform(rule.options.seed, step, torch.arange(n) + START)


def _cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {f"random k={k}": torch.randn(k, 400, generator=gen, dtype=F64) for k in (1, 2, 3, 6)}
    mixed = torch.randn(4, 400, generator=gen, dtype=F64)
    mixed[:, :50] = mixed[:, :50].abs()  # P = 1
    mixed[:, 50:100] = -mixed[:, 50:100].abs()  # P = 0
    mixed[:, 100:120] = 0.0  # no gradient: torchjd's P is NaN, LibMTL's 0.5
    mixed[1, 120:140] = 0.0  # zeros among signed values
    out["adversarial"] = mixed
    out["spread"] = torch.randn(5, 400, generator=gen, dtype=F64) * torch.logspace(-8, 8, 5, dtype=F64)[:, None]
    return out


@pytest.mark.anchors
@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("leak", [0.0, 0.3, "per-group"])
def test_equals_torchjd_given_the_same_draws(case, leak, torchjd_aggregation):
    rows = _cases()[case]
    k = rows.shape[0]
    names = [f"t{i}" for i in range(k)]
    leaks = torch.linspace(0.0, 1.0, k, dtype=F64) if leak == "per-group" else torch.full((k,), float(leak), dtype=F64)
    option = dict(zip(names, leaks.tolist(), strict=True)) if leak == "per-group" else leak
    rule = GradDrop(seed=11, leak=option)
    ours = _combine(rule, rows, names=names)
    u = _draws(rule, rows.shape[1])
    with mock.patch.object(torch, "rand", lambda *a, **kw: u.clone()):
        expected = torchjd_aggregation.GradDrop(leak=leaks)(rows)
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=1e-14 * float(rows.abs().max()))
    if leak == 0.0 and k > 1:
        assert not torch.allclose(ours, rows.sum(0))  # something was dropped


@pytest.mark.anchors
@pytest.mark.parametrize("case", ["random k=3", "adversarial", "random k=6"])
@pytest.mark.parametrize("leak", [0.0, 0.5])
def test_equals_libmtl_on_a_one_sample_representation(case, leak, libmtl):
    """LibMTL applies GradDrop to the gradients at the shared representation, summed over the batch
    after multiplying by the sign of the representation: with one sample of positive values these are
    the rows themselves, and the gradient it sends into the representation is our combination."""
    rows = _cases()[case]
    k, d = rows.shape
    rule = GradDrop(seed=4, leak=leak)
    ours = _combine(rule, rows)
    weighting = libmtl.GradDrop()
    weighting.rep = torch.rand(1, d, dtype=F64).add(0.1).requires_grad_(True)
    weighting.rep_grad, weighting.task_num = True, k
    weighting._compute_grad = lambda losses, mode, rep_grad=False: rows[:, None, :].clone()
    u = _draws(rule, d)
    with mock.patch.object(torch, "rand_like", lambda p, **kw: u.clone()):
        weighting.backward(torch.zeros(k), leak=leak)
    expected = weighting.rep.grad[0]
    # LibMTL adds 1e-7 to Σ|r| in P: a mask differs only where |P - U| < 1e-7 / Σ|r|, nowhere here
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12 * float(rows.abs().max()))


def test_deterministic_limits():
    gen = torch.Generator().manual_seed(2)
    positive = torch.rand(3, 500, generator=gen, dtype=F64) + 0.01
    torch.testing.assert_close(_combine(GradDrop(), positive), positive.sum(0))  # P = 1 > U: all kept
    torch.testing.assert_close(_combine(GradDrop(), -positive), -positive.sum(0))  # P = 0 < U (U > 0 here)
    assert torch.equal(_combine(GradDrop(), torch.zeros(3, 50, dtype=F64)), torch.zeros(50, dtype=F64))
    torch.testing.assert_close(_combine(GradDrop(leak=1.0), _cases()["random k=3"]), _cases()["random k=3"].sum(0))


def test_each_sign_survives_with_its_purity():
    """A column with P = 0.3, repeated over 100k coordinates (independent draws): the positive side
    survives in 30% of them, the negative side in the rest, never both, never neither."""
    n = 100_000
    rows = torch.tensor([[0.3], [-0.7]], dtype=F64).expand(2, n).contiguous()
    out = _combine(GradDrop(seed=9), rows, step=17)
    positive = (out == 0.3).double().mean()
    assert bool(((out == 0.3) | (out == -0.7)).all())
    assert abs(float(positive) - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # 4 standard deviations
    later = _combine(GradDrop(seed=9), rows, step=18)
    assert 0.3 < float((later != out).double().mean()) < 0.54  # fresh draws each step: 2·0.3·0.7 = 0.42


def test_weights_scale_the_rows():
    rows = _cases()["random k=3"]
    rule = GradDrop(seed=1)
    w = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    stats = GroupStats.from_gram(rows @ rows.T, step=3)
    weights, state = rule.update(stats, w, rule.init())
    assert torch.equal(weights, w)
    torch.testing.assert_close(
        rule.combine(rows * w[:, None], _columns(rows.shape[1]), state), _combine(rule, rows * w[:, None])
    )
