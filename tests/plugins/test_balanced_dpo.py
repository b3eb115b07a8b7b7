"""balanced_dpo: each rule's weights and gradients against hand-computed float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from balancer import Balancer, ConfigError, GroupStats, PluginError
from balancer.plugins import BalancedDPO
from balancer.recipes.dpo import dpo_group_losses, tap_pairs

BETA = 0.1


def _stats(norms, names=("chosen", "rejected")):
    return GroupStats.from_gram(torch.diag(torch.tensor(norms, dtype=torch.float64) ** 2), names)


def test_norm_rule_equalizes_the_two_sides_only():
    plugin = BalancedDPO(rule="norm")
    w, state = plugin.update(
        _stats([1.0, 4.0, 9.0], ("chosen", "sft", "rejected")), torch.ones(3, dtype=torch.float64), plugin.init()
    )
    torch.testing.assert_close(w, torch.tensor([5.0, 1.0, 5.0 / 9.0], dtype=torch.float64))
    metrics = plugin.metrics(state)
    assert metrics["chosen_norm"].item() == 1.0 and metrics["rejected_norm"].item() == 9.0
    assert metrics["rejected_over_chosen_norm"].item() == 9.0
    assert metrics["chosen_weight"].item() == 5.0


def test_norm_rule_partial_and_with_incoming_weights():
    plugin = BalancedDPO(rule="norm", alpha=0.5)
    w, _ = plugin.update(_stats([1.0, 4.0]), torch.tensor([2.0, 1.0], dtype=torch.float64), plugin.init())
    # contributions 2 and 4, mean 3: factors (3/2)^0.5 and (3/4)^0.5 on top of the incoming weights
    torch.testing.assert_close(w, torch.tensor([2.0 * 1.5**0.5, 0.75**0.5], dtype=torch.float64))


def test_norm_rule_ema_of_norms():
    plugin = BalancedDPO(rule="norm", beta=0.5)
    state = plugin.init()
    _, state = plugin.update(_stats([1.0, 3.0]), torch.ones(2, dtype=torch.float64), state)
    w, _ = plugin.update(_stats([3.0, 3.0]), torch.ones(2, dtype=torch.float64), state)
    ema = torch.tensor([2.0, 3.0], dtype=torch.float64)  # 0.5·[1, 3] + 0.5·[3, 3]
    torch.testing.assert_close(w, ema.mean() / ema)


def test_norm_rule_with_one_side_absent_or_zero():
    plugin = BalancedDPO(rule="norm")
    w, _ = plugin.update(_stats([2.0], ("chosen",)), torch.ones(1, dtype=torch.float64), plugin.init())
    assert w.tolist() == [1.0]
    w, _ = plugin.update(_stats([3.0], ("other",)), torch.ones(1, dtype=torch.float64), plugin.init())
    assert w.tolist() == [1.0]
    w, _ = plugin.update(_stats([0.0, 2.0]), torch.ones(2, dtype=torch.float64), plugin.init())
    assert torch.isfinite(w).all() and w[1].item() == 1.0


def _policy(seed=0, prompts=3, responses=6, dim=4):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(prompts, responses, dim, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
    pairs = torch.tensor([[0, 1, 2], [1, 3, 0], [2, 5, 4], [0, 2, 5]])  # prompt, chosen, rejected
    return features, theta, pairs


def _logps(features, theta, pairs):
    logp = torch.log_softmax(features @ theta, dim=-1)
    return logp[pairs[:, 0], pairs[:, 1]], logp[pairs[:, 0], pairs[:, 2]]


@pytest.mark.parametrize(("side", "clip"), [("chosen", 2.0), ("chosen", 100.0), ("rejected", 2.0)])
def test_prob_rule_gradient_equals_the_reweighted_split(side, clip):
    features, theta, pairs = _policy()
    ref_w, ref_l = (t.detach() - 0.3 for t in _logps(features, theta, pairs))
    lw, ll = _logps(features, theta, pairs)
    ratio = torch.exp(lw - ll).detach()
    f = torch.clamp(ratio, max=clip)
    if side == "chosen":
        fw, fl = f, torch.ones_like(f)
    else:
        fw, fl = torch.ones_like(f), torch.clamp(1.0 / ratio, 1.0 / clip, clip)
    c = BETA * torch.sigmoid(-BETA * ((lw - ref_w) - (ll - ref_l))).detach()
    expected = torch.autograd.grad((-(c * fw * lw) + c * fl * ll).mean(), [theta])[0]

    opt = Balancer(
        torch.optim.SGD([theta], lr=1.0), plugins=[("balanced_dpo", {"rule": "prob", "side": side, "clip": clip})]
    )
    start = theta.detach().clone()
    tw, tl = tap_pairs(opt, *_logps(features, theta, pairs))
    opt.backward(dpo_group_losses(tw, tl, ref_w, ref_l, beta=BETA))
    opt.step()
    # θ - g is rounded at eps·|θ| and a coordinate of g may cancel: the floor follows both scales.
    floor = 1e-14 * (start.abs().max() + expected.abs().max()).item()
    torch.testing.assert_close(start - theta.detach(), expected, rtol=1e-12, atol=floor)
    metrics = opt.plugin_metrics()["balanced_dpo"]
    torch.testing.assert_close(metrics["prob_factor"], (fw * fl).mean())
    torch.testing.assert_close(metrics["logp_chosen"], lw.detach().mean())
    torch.testing.assert_close(metrics["logp_rejected"], ll.detach().mean())
    assert math.isnan(metrics["logp_chosen_change"].item())  # no previous step yet


def test_log_prob_change_between_steps():
    features, theta, pairs = _policy(1)
    opt = Balancer(torch.optim.SGD([theta], lr=1.0), plugins=[("balanced_dpo", {"rule": "prob"})])
    ref = [t.detach() for t in _logps(features, theta, pairs)]
    means = []
    for _ in range(2):
        lw, ll = _logps(features, theta, pairs)
        means.append((lw.mean().item(), ll.mean().item()))
        opt.backward(dpo_group_losses(*tap_pairs(opt, lw, ll), *ref, beta=BETA))
        opt.step()
        opt.zero_grad()
    m = opt.plugin_metrics()["balanced_dpo"]
    for side, key in enumerate(("logp_chosen_change", "logp_rejected_change")):
        change, scale = means[1][side] - means[0][side], abs(means[1][side]) + abs(means[0][side])
        assert m[key].item() == pytest.approx(change, rel=1e-9, abs=1e-14 * scale)  # a change may be ~0


def _tap_grad(plugin, logp_w, logp_l, upstream):
    """The gradient arriving at [logp_w; logp_l] after the plugin's tap, for a given upstream gradient."""
    theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Balancer(torch.optim.SGD([theta], lr=1.0), plugins=[plugin])
    lw = (logp_w + 0 * theta).requires_grad_()
    ll = (logp_l + 0 * theta).requires_grad_()
    tw, tl = tap_pairs(opt, lw, ll)
    gw, gl = torch.autograd.grad((tw * upstream[0]).sum() + (tl * upstream[1]).sum(), [lw, ll])
    return gw, gl


def test_prob_rule_zero_probability_pairs_are_finite():
    inf = float("inf")
    logp_w = torch.tensor([-1.0, -inf, -inf, -2.0], dtype=torch.float64)
    logp_l = torch.tensor([-inf, -1.0, -inf, -2.0], dtype=torch.float64)
    up = (torch.full((4,), -1.0, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    gw, gl = _tap_grad(BalancedDPO(rule="prob", clip=2.0), logp_w, logp_l, up)
    # π_l = 0 < π_w: factor C; π_w = 0 < π_l: factor 0; both 0: factor 1; equal: factor 1
    assert gw.tolist() == [-2.0, -0.0, -1.0, -1.0]
    assert gl.tolist() == [1.0] * 4
    gw, gl = _tap_grad(BalancedDPO(rule="prob", side="rejected"), logp_w, logp_l, up)
    assert torch.isfinite(gl).all() and gl.tolist() == [0.5, 2.0, 1.0, 1.0]


def test_prob_rule_floor_bounds_the_chosen_factor_from_below():
    logp_w = torch.tensor([-30.0, -1.0, float("-inf")], dtype=torch.float64)
    logp_l = torch.tensor([-1.0, -30.0, -2.0], dtype=torch.float64)
    up = (torch.full((3,), -1.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    gw, _ = _tap_grad(BalancedDPO(rule="prob", clip=2.0, floor=0.5), logp_w, logp_l, up)
    assert gw.tolist() == [-0.5, -2.0, -0.5]
    gw, _ = _tap_grad(BalancedDPO(rule="prob", clip=2.0), logp_w, logp_l, up)
    assert gw.tolist() == [-math.exp(-29.0), -2.0, -0.0]


def test_prob_rule_with_an_empty_side_leaves_the_gradient_alone():
    plugin = BalancedDPO(rule="prob")
    theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Balancer(torch.optim.SGD([theta], lr=1.0), plugins=[plugin])
    x = (torch.tensor([-1.0, -3.0], dtype=torch.float64) + 0 * theta).requires_grad_()
    tapped = opt.tap(x, group="chosen", labels=torch.tensor([0, 1]))
    (grad,) = torch.autograd.grad(tapped.sum(), [x])
    assert grad.tolist() == [1.0, 1.0]


def test_prob_rule_needs_pair_labels():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = Balancer(torch.optim.SGD([theta], lr=1.0), plugins=[("balanced_dpo", {"rule": "prob"})])
    with pytest.raises(PluginError, match="tap_pairs"):
        opt.tap(theta * 1.0, group=["chosen", "rejected"]).sum().backward()


def test_state_round_trip(tmp_path):
    features, theta, pairs = _policy(2)
    ref = [t.detach() for t in _logps(features, theta, pairs)]

    def run(opt, steps):
        for _ in range(steps):
            opt.backward(dpo_group_losses(*tap_pairs(opt, *_logps(features, theta, pairs)), *ref, beta=BETA))
            opt.step()
            opt.zero_grad()

    plugins = [("balanced_dpo", {"rule": "norm", "beta": 0.7})]
    opt = Balancer(torch.optim.Adam([theta], lr=0.05), plugins=plugins)
    run(opt, 2)
    torch.save({"theta": theta.detach().clone(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    run(opt, 2)
    straight = theta.detach().clone()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    with torch.no_grad():
        theta.copy_(saved["theta"])
    fresh = Balancer(torch.optim.Adam([theta], lr=0.05), plugins=plugins)
    fresh.load_state_dict(saved["opt"])
    run(fresh, 2)
    assert torch.equal(theta.detach(), straight)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clip": 3.0}, r"clip=3\.0 would be ignored with rule='norm'.*Set rule='prob'"),
        ({"side": "rejected", "floor": 0.5}, r"side='rejected', floor=0\.5 would be ignored with rule='norm'"),
        ({"alpha": 0.0}, r"alpha=0 with rule='norm' changes no weight"),
        ({"rule": "prob", "alpha": 0.5}, r"alpha=0\.5 would be ignored with rule='prob'.*Set rule='norm'"),
        ({"rule": "prob", "beta": 0.9}, r"beta=0\.9 would be ignored with rule='prob'"),
        ({"rule": "prob", "side": "rejected", "floor": 0.5}, r"floor=0\.5 would be ignored with side='rejected'"),
        ({"rule": "prob", "side": "rejected", "clip": 1.0}, r"clip=1\.0 with side='rejected' leaves no room"),
        ({"chosen": "pair", "rejected": "pair"}, r"chosen and rejected are both 'pair'"),
    ],
)
def test_ignored_or_contradictory_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=rf"plugins\.0\.options.*{message}"):
        Balancer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), plugins=[("balanced_dpo", options)])
    BalancedDPO(rule="prob", side="chosen", clip=3.0, floor=0.5)  # every option used
