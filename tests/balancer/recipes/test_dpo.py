"""DPO helpers against float64 definitions; the chosen/rejected split sums to the DPO gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import Balancer
from balancer.recipes.dpo import dpo_group_losses, dpo_loss, dpo_metrics, sequence_logprobs, tap_pairs


def _lm(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7)).double()


def _batch(seed, pairs=4, length=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (2 * pairs, length), generator=g)
    mask = torch.rand(2 * pairs, length, generator=g) < 0.8
    mask[:, 0] = True
    return tokens, mask


def test_sequence_logprobs_against_a_loop():
    logits = torch.randn(3, 4, 6, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 4))
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    labels[~mask] = -100  # ignored entries may hold anything
    total = sequence_logprobs(logits, labels, mask)
    mean = sequence_logprobs(logits, labels, mask, reduction="mean")
    for b in range(3):
        terms = [math.log(torch.softmax(logits[b, t], -1)[labels[b, t]].item()) for t in range(4) if mask[b, t].item()]
        assert total[b].item() == pytest.approx(sum(terms), abs=1e-12)
        assert mean[b].item() == pytest.approx(sum(terms) / len(terms) if terms else 0.0, abs=1e-12)


def test_sequence_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits \\[B, T, V\\]"):
        sequence_logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2))
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), reduction="max")


def test_dpo_loss_is_the_formula():
    lw, ll, rw, rl = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    u = 0.3 * ((lw - rw) - (ll - rl))
    expected = torch.log1p(torch.exp(-u)).mean()
    torch.testing.assert_close(dpo_loss(lw, ll, rw, rl, beta=0.3), expected, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(lw, ll, rw, rl, beta=0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.01, 5.0), reduction=st.sampled_from(["sum", "mean"]))
def test_the_split_sums_to_the_dpo_gradient(seed, beta, reduction):
    model = _lm(seed % 7)
    tokens, mask = _batch(seed)
    ref = _lm(seed % 7 + 100)
    with torch.no_grad():
        ref_lp = sequence_logprobs(ref(tokens), tokens, mask, reduction=reduction)
    params = list(model.parameters())
    lp = sequence_logprobs(model(tokens), tokens, mask, reduction=reduction)
    lw, ll = lp[:4], lp[4:]
    dpo = torch.autograd.grad(dpo_loss(lw, ll, ref_lp[:4], ref_lp[4:], beta=beta), params, retain_graph=True)
    parts = dpo_group_losses(lw, ll, ref_lp[:4], ref_lp[4:], beta=beta)
    assert set(parts) == {"chosen", "rejected"}
    split = torch.autograd.grad(parts["chosen"] + parts["rejected"], params)
    for a, b in zip(dpo, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_balancer_without_plugins_on_the_split_is_the_dpo_step():
    model, ref = _lm(1), _lm(2)
    tokens, mask = _batch(3)
    with torch.no_grad():
        r = sequence_logprobs(ref(tokens), tokens, mask)
    reference = [p.detach().clone() for p in model.parameters()]
    lp = sequence_logprobs(model(tokens), tokens, mask)
    grads = torch.autograd.grad(dpo_loss(lp[:4], lp[4:], r[:4], r[4:]), list(model.parameters()))
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.5))
    lp = sequence_logprobs(model(tokens), tokens, mask)
    opt.backward(dpo_group_losses(lp[:4], lp[4:], r[:4], r[4:]))
    opt.step()
    assert opt.last_stats.names == ("chosen", "rejected")
    for p, p0, g in zip(model.parameters(), reference, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, rtol=1e-12, atol=1e-14)


def test_dpo_metrics():
    lw, ll = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rw, rl = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    m = dpo_metrics(lw, ll, rw, rl, beta=0.5)
    torch.testing.assert_close(m["reward_chosen"], torch.tensor(0.125))
    torch.testing.assert_close(m["reward_rejected"], torch.tensor(0.0))
    torch.testing.assert_close(m["reward_margin"], torch.tensor(0.125))
    torch.testing.assert_close(m["reward_accuracy"], torch.tensor(0.5))


def test_tap_pairs_keeps_values_and_checks_shapes():
    opt = Balancer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), plugins=["balanced_dpo"])
    lw, ll = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    tw, tl = tap_pairs(opt, lw, ll)
    assert torch.equal(tw, lw) and torch.equal(tl, ll)
    with pytest.raises(ValueError, match="same shape"):
        tap_pairs(opt, lw, ll[:2])
