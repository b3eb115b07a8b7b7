"""excess_mtl (He et al. 2024): the per-group update against a float64 reference written out group by group,
against torchjd 0.18's ExcessMTLWeighting where the per-coordinate and per-group preconditioners coincide
(every coordinate of a group's gradient with the same magnitude), torchjd's raw first step, its saturation
on a group whose baseline is zero, warm-up, scale invariance and named state."""

from __future__ import annotations

import math

import pytest
import torch

from balancer import GroupStats
from balancer.plugins import ExcessMTL

F64 = torch.float64


def _general(k: int, steps: int, seed: int = 0, n: int = 11) -> list[torch.Tensor]:
    """Gradients whose coordinates differ in size and shrink over the steps at a different rate per group."""
    gen = torch.Generator().manual_seed(seed)
    decay = torch.rand(k, 1, generator=gen, dtype=F64) * 0.3 + 0.6
    spread = torch.logspace(-1, 1, n, dtype=F64)
    return [torch.randn(k, n, generator=gen, dtype=F64) * decay**t * spread for t in range(steps)]


def _flat(k: int, steps: int, seed: int = 0, n: int = 40) -> list[torch.Tensor]:
    """|g_ij(t)| = c_i(t) in every coordinate j: per-coordinate Adagrad equals its per-group mean."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        signs = torch.randint(0, 2, (k, n), generator=gen).to(F64) * 2 - 1
        out.append(signs * (torch.rand(k, 1, generator=gen, dtype=F64) * 2 + 1))
    return out


def _run(plugin: ExcessMTL, sequence: list[torch.Tensor], names=None) -> tuple[list[torch.Tensor], dict]:
    state, out = plugin.init(), []
    for t, a in enumerate(sequence):
        w, state = plugin.update(GroupStats.from_gram(a @ a.T, names, step=t), torch.ones(a.shape[0], dtype=F64), state)
        out.append(w)
    return out, state


def _reference(sequence: list[torch.Tensor], eta: float = 1.0, warmup: int = 0) -> list[torch.Tensor]:
    """The documented rule, group by group in float64: S_i += ‖g_i‖², Ê_i = ‖g_i‖²/sqrt(S_i), baseline the
    warm-up mean (or the first step's Ê), log α ← log_softmax(log α + η Ê/Ê⁰) after warm-up."""
    k = sequence[0].shape[0]
    sq_sum, risk_sum, baseline = [0.0] * k, [0.0] * k, [None] * k
    log_alpha, out = torch.full((k,), -math.log(k), dtype=F64), []
    for t, a in enumerate(sequence):
        ratio = torch.zeros(k, dtype=F64)
        for i in range(k):
            sq = float(a[i] @ a[i])
            sq_sum[i] += sq
            risk = sq / math.sqrt(sq_sum[i]) if sq_sum[i] > 0 else 0.0
            if t < warmup:
                risk_sum[i] += risk
                continue
            if baseline[i] is None:
                candidate = risk_sum[i] / warmup if warmup and risk_sum[i] > 0 else risk
                baseline[i] = candidate if candidate > 0 else None
            ratio[i] = risk / baseline[i] if baseline[i] else 0.0
        log_alpha = torch.log_softmax(log_alpha + eta * ratio, dim=0)
        out.append(log_alpha.exp())
    return out


@pytest.mark.parametrize(("eta", "warmup"), [(1.0, 0), (0.3, 2), (5.0, 1)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_the_documented_rule_on_general_gradients(eta: float, warmup: int, k: int) -> None:
    sequence = _general(k, 10, seed=k)
    weights, _ = _run(ExcessMTL(robust_step_size=eta, warmup_steps=warmup), sequence)
    for w, expected in zip(weights, _reference(sequence, eta, warmup), strict=True):
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-300)


def test_warmup_keeps_weights_uniform_and_takes_the_mean_excess_risk_as_baseline() -> None:
    sequence = _general(3, 5, seed=1)
    weights, state = _run(ExcessMTL(warmup_steps=3), sequence[:3])
    for w in weights:
        torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=F64), rtol=1e-15, atol=0)
    assert torch.isnan(state["baseline"]).all()
    sq = torch.stack([(a * a).sum(1) for a in sequence[:3]])
    risks = sq / sq.cumsum(0).sqrt()
    torch.testing.assert_close(state["risk_sum"], risks.sum(0), rtol=1e-13, atol=0)


def test_weights_do_not_depend_on_the_gradients_scale() -> None:
    sequence = _general(3, 8, seed=2)
    base, _ = _run(ExcessMTL(warmup_steps=2), sequence)
    for factor in (1e-9, 1e7):
        scaled, _ = _run(ExcessMTL(warmup_steps=2), [factor * a for a in sequence])
        for w, expected in zip(scaled, base, strict=True):
            torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)


def test_new_group_gets_its_own_history_and_absent_group_keeps_its_state() -> None:
    plugin = ExcessMTL()
    _, state = _run(plugin, _general(2, 3, seed=3), ["a", "b"])
    saved = {key: state[key][0].clone() for key in ("log_weights", "sq_sum", "baseline", "steps")}
    rows = _general(2, 1, seed=4)[0]
    w, state = plugin.update(GroupStats.from_gram(rows @ rows.T, ["b", "c"]), torch.ones(2, dtype=F64), state)
    assert state["names"] == ["a", "b", "c"]
    assert all(torch.equal(state[key][0], value) for key, value in saved.items())
    assert state["steps"].tolist() == [3.0, 4.0, 1.0]
    torch.testing.assert_close(state["sq_sum"][2], rows[1] @ rows[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(state["baseline"][2], rows[1].norm(), rtol=1e-14, atol=0)  # Ê = ‖g‖ at its first step
    assert torch.isfinite(w).all() and abs(w.sum().item() - 1.0) < 1e-14


@pytest.mark.anchors
@pytest.mark.parametrize(("eta", "warmup"), [(1.0, 1), (0.5, 3), (3.0, 2)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_equals_torchjd_when_coordinates_have_equal_magnitude(torchjd_aggregation, eta, warmup, k) -> None:  # type: ignore[no-untyped-def]
    """With |g_ij(t)| = c_i(t) ≥ 1 torchjd's floors (sqrt(S + 1e-7), Ê⁰ + 1e-7) are ~1e-7 relative in each ratio;
    summed over 12 steps in the exponent (η up to 3) they reach ~1e-6 in the weights."""
    anchor = torchjd_aggregation.ExcessMTLWeighting(robust_step_size=eta, n_warmup_steps=warmup)
    sequence = _flat(k, 12, seed=k)
    weights, _ = _run(ExcessMTL(robust_step_size=eta, warmup_steps=warmup), sequence)
    for a, w in zip(sequence, weights, strict=True):
        torch.testing.assert_close(w, anchor(a), rtol=1e-5, atol=1e-12)


@pytest.mark.anchors
@pytest.mark.parametrize("k", [2, 4])
def test_without_warmup_torchjd_keeps_its_raw_first_step_factor(torchjd_aggregation, k: int) -> None:  # type: ignore[no-untyped-def]
    """torchjd's first step multiplies α by exp(η Ê_raw) (unscaled); the plugin's first ratio is 1. From then on
    both take the same steps, so the plugin's weights are torchjd's divided by its first weights, renormalised."""
    anchor = torchjd_aggregation.ExcessMTLWeighting(robust_step_size=0.2)
    sequence = _flat(k, 10, seed=10 + k, n=6)
    weights, _ = _run(ExcessMTL(robust_step_size=0.2), sequence)
    first = anchor(sequence[0])
    torch.testing.assert_close(weights[0], torch.full((k,), 1 / k, dtype=F64), rtol=1e-15, atol=0)
    assert (first - 1 / k).abs().max() > 1e-3  # the raw factor is not 1
    for a, w in zip(sequence[1:], weights[1:], strict=True):
        ratio = anchor(a) / first
        torch.testing.assert_close(w, ratio / ratio.sum(), rtol=1e-6, atol=1e-12)


@pytest.mark.anchors
def test_a_zero_gradient_at_the_baseline_does_not_saturate_the_weights(torchjd_aggregation) -> None:  # type: ignore[no-untyped-def]
    """Group 1 has no gradient at the first step: torchjd's baseline is 0, it divides by 1e-7 and gives that
    group all the weight for good; the plugin takes the group's baseline at its first positive step."""
    sequence = _flat(3, 6, seed=7, n=8)
    sequence[0] = sequence[0].clone()
    sequence[0][1] = 0.0
    anchor = torchjd_aggregation.ExcessMTLWeighting(n_warmup_steps=1)
    saturated = [anchor(a) for a in sequence][-1]
    assert saturated[1] > 1 - 1e-12
    weights, state = _run(ExcessMTL(warmup_steps=1), sequence)
    for w, expected in zip(weights, _reference(sequence, warmup=1), strict=True):
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-300)
    assert torch.isfinite(state["baseline"]).all() and weights[-1].max() < 0.9
