"""crmogm (CR-MOGM, Zhou et al. 2022): λ_t = α λ_{t-1} + (1-α) λ̂_t over the incoming weights of the chain,
step for step equal to torchjd 0.18's CRMOGMWeighting around UPGrad and MGDA; names, λ_0, placement."""

from __future__ import annotations

import warnings

import pytest
import torch

from balancer import Balancer, BalancerWarning, ConfigError, GramWeighting, GroupStats, State
from balancer.contract.chain import Chain
from balancer.plugins import CRMOGM, MGDA, UPGrad
from balancer.recipes.split_half import SplitHalf

F64 = torch.float64


def _grams(k: int, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(k, 3 * k, generator=gen, dtype=F64) * (0.2 + torch.rand(k, 1, generator=gen, dtype=F64))
        for _ in range(steps)
    ]
    return [a @ a.T for a in rows]


def _chain(plugins: list, grams: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[type-arg]
    chain = Chain(plugins)
    states, out = chain.init(), []
    for gram in grams:
        w, states = chain.run(GroupStats.from_gram(gram, [f"g{i}" for i in range(gram.shape[0])]), states)
        out.append(w)
    return out


@pytest.mark.anchors
@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_after_upgrad_equals_torchjd(torchjd_aggregation, alpha: float, k: int) -> None:
    """torchjd's UPGradWeighting regularises its projection (reg_eps = 1e-4): so does ours here; the two
    agree to 1e-5 (test_upgrad), measured ~1e-8, and the smoothing adds no error of its own."""
    grams = _grams(k, 6, seed=k)
    ref = torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.UPGradWeighting(), alpha=alpha)
    for w, gram in zip(_chain([UPGrad(reg_eps=1e-4), CRMOGM(alpha=alpha)], grams), grams, strict=True):
        torch.testing.assert_close(w, ref(gram), rtol=1e-5, atol=1e-8)


@pytest.mark.anchors
@pytest.mark.parametrize("alpha", [0.3, 0.9])
def test_after_mgda_equals_torchjd(torchjd_aggregation, alpha: float) -> None:
    """With 2 groups torchjd's Frank-Wolfe MGDA is exact (test_mgda), so the whole chain is compared;
    with more, torchjd's MGDA stops short (~1e-2), so its own weights are fed in to compare the smoothing."""
    grams = _grams(2, 6, seed=1)
    ref = torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.MGDAWeighting(), alpha=alpha)
    for w, gram in zip(_chain([MGDA(), CRMOGM(alpha=alpha)], grams), grams, strict=True):
        torch.testing.assert_close(w, ref(gram), rtol=1e-5, atol=1e-5)
    inner = torchjd_aggregation.MGDAWeighting()
    initial = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64)
    ref = torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.MGDAWeighting(), alpha=alpha, initial_weights=initial)
    plugin = CRMOGM(alpha=alpha, initial={f"g{i}": float(v) for i, v in enumerate(initial)})
    state = plugin.init()
    for gram in _grams(4, 6, seed=2):
        w, state = plugin.update(GroupStats.from_gram(gram, [f"g{i}" for i in range(4)]), inner(gram), state)
        torch.testing.assert_close(w, ref(gram), rtol=1e-13, atol=1e-15)


def test_the_papers_recursion_and_first_step() -> None:
    """λ_1 = λ̂_1 whatever α (λ_0 = λ̂_1), then λ_t = α λ_{t-1} + (1-α) λ̂_t; α = 1 freezes at λ_0."""
    incoming = [torch.tensor(v, dtype=F64) for v in ([0.2, 0.8], [0.6, 0.4], [1.0, 0.0])]
    stats = GroupStats.from_gram(torch.eye(2, dtype=F64), ["a", "b"])
    for alpha in (0.25, 1.0):
        plugin, lam = CRMOGM(alpha=alpha), incoming[0]
        state = plugin.init()
        for t, hat in enumerate(incoming):
            w, state = plugin.update(stats, hat, state)
            lam = hat if t == 0 else alpha * lam + (1 - alpha) * hat
            torch.testing.assert_close(w, lam, rtol=1e-15, atol=0)
        assert alpha < 1 or torch.equal(w, incoming[0])


def test_groups_are_matched_by_name() -> None:
    """A group keeps its λ while absent and continues from it; a new group starts from its incoming weight
    (or its `initial` weight); the order of the groups in a step does not matter."""
    alpha = 0.5
    plugin = CRMOGM(alpha=alpha, initial={"c": 3.0})
    state = plugin.init()
    steps = [(["a", "b"], [1.0, 2.0]), (["b", "c"], [4.0, 5.0]), (["c", "a", "b"], [7.0, 9.0, 0.0])]
    # b: 2 -> ½·2 + ½·4 = 3 -> ½·3 + ½·0; c from initial 3: ½·3 + ½·5 = 4 -> ½·4 + ½·7; a skips step 2: ½·1 + ½·9
    expected = [[1.0, 2.0], [3.0, 4.0], [5.5, 5.0, 1.5]]
    for (names, hat), exp in zip(steps, expected, strict=True):
        stats = GroupStats.from_gram(torch.eye(len(names), dtype=F64), names)
        w, state = plugin.update(stats, torch.tensor(hat, dtype=F64), state)
        assert w.tolist() == exp
    plugin.check_state(state)


def test_placed_first_it_is_refused_and_after_ones_it_warns() -> None:
    """First in a Balancer (or in split_half) it would get ones at every step: refused when built. After a
    plugin whose weights are all 1 it smooths nothing: its metric says so and warns; after MGDA it does not."""
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match=r"plugins\.0: `crmogm` transforms the weights of the plugins before"):
        Balancer(torch.optim.SGD([param], lr=1.0), plugins=["crmogm"])
    with pytest.raises(ConfigError, match=r"split_half\.plugins\.0: `crmogm` transforms the weights"):
        SplitHalf(["crmogm"])

    class Ones(GramWeighting[State]):
        name = "ones"

        def weigh(self, stats: GroupStats, state: State) -> tuple[torch.Tensor, State]:
            return torch.ones(stats.num_groups, dtype=torch.float64), state

    after_ones = Chain([Ones(), CRMOGM()])
    states = after_ones.init()
    for gram in _grams(3, 2, seed=4):
        w, states = after_ones.run(GroupStats.from_gram(gram, ["a", "b", "c"]), states)
        assert w.tolist() == [1.0, 1.0, 1.0]
    with pytest.warns(BalancerWarning, match=r"crmogm received weights all equal to 1 in each of its 2 steps"):
        assert float(CRMOGM().metrics(states["crmogm"])["smoothing"]) == 0.0
    after = Chain([MGDA(), CRMOGM()])
    states = after.init()
    for gram in _grams(3, 2, seed=4):
        _, states = after.run(GroupStats.from_gram(gram, ["a", "b", "c"]), states)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(CRMOGM().metrics(states["crmogm"])["smoothing"]) == 1.0
        CRMOGM().metrics(CRMOGM().init())  # no step yet: nothing to say


def test_in_a_balancer_the_update_uses_the_smoothed_weights() -> None:
    param = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = Balancer(torch.optim.SGD([param], lr=1.0), plugins=["mgda", ("crmogm", {"alpha": 0.5})])
    targets = [torch.tensor(v, dtype=F64) for v in ([1.0, 0.0, 0.0], [0.0, 2.0, 0.0])]
    lam = None
    for step in range(3):
        losses = {f"t{i}": (t * (step + 1 + i)) @ param for i, t in enumerate(targets)}
        grads = torch.stack([t * (step + 1 + i) for i, t in enumerate(targets)])
        hat = MGDA().update(GroupStats.from_gram(grads @ grads.T, list(losses)), torch.ones(2, dtype=F64), {})[0]
        lam = hat if lam is None else 0.5 * lam + 0.5 * hat
        before = param.detach().clone()
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(before - param.detach(), lam @ grads, rtol=1e-12, atol=1e-14)
