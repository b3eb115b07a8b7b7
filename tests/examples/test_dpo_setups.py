"""The pieces of ``examples/experiments/dpo_imbalance.py`` checked on numbers: the disjoint pairs,
the ideal policy against a direct float64 computation, the reward-vs-KL frontier, the metrics on
hand-built cases, and one run reproduced exactly."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "experiments"))

from dpo_setups.discrete import Discrete, DiscreteTask, best_reward_at_kl, centered_corr  # noqa: E402
from dpo_setups.training import matched_kl_gain, reward_at_kl, train  # noqa: E402

CFG = Discrete(prompts=4, responses=32, in_dist=12, chosen=5, pairs=300, steps=30, eval_every=10)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread, as the experiment runs (and restored: other tests keep theirs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[0, 1, 2])
def task(request: pytest.FixtureRequest) -> DiscreteTask:
    return DiscreteTask(CFG, request.param, beta=0.1)


def test_disjoint_pairs_chosen_from_the_best_rejected_from_the_worst(task: DiscreteTask) -> None:
    assert not (task.chosen_set & task.rejected_set).any()
    assert task.overlap() == 0.0
    assert (task.chosen_set.sum(-1) == CFG.chosen).all() and (task.rejected_set.sum(-1) == CFG.chosen).all()
    assert task.chosen_set[task.x, task.w].all() and task.rejected_set[task.x, task.l].all()
    top = torch.zeros_like(task.chosen_set).scatter_(1, task.ref_logp.topk(CFG.in_dist, -1).indices, True)
    assert not ((task.chosen_set | task.rejected_set) & ~top).any()  # both come from S
    for p in range(CFG.prompts):
        in_s = task.reward[p][top[p]].sort(descending=True).values
        chosen = task.reward[p][task.chosen_set[p]]
        rejected = task.reward[p][task.rejected_set[p]]
        assert torch.equal(chosen.sort(descending=True).values, in_s[: CFG.chosen])
        assert torch.equal(rejected.sort(descending=True).values, in_s[-CFG.chosen :])
        assert chosen.min() > rejected.max()
    assert torch.equal(task.in_dist, task.chosen_set | task.rejected_set)


def test_overlapping_pairs_share_responses() -> None:
    task = DiscreteTask(CFG, 0, beta=0.1, pairing="overlap")
    assert task.overlap() > 0.5  # the earlier setting's confound
    assert (task.w != task.l).all()


def test_ideal_policy_matches_a_direct_float64_computation(task: DiscreteTask) -> None:
    for beta in (0.1, 1.0):
        task.beta = beta
        ref = task.ref_logp.exp()
        unnormalised = ref * torch.exp((task.reward - task.reward.max(-1, keepdim=True).values) / beta)
        direct = unnormalised / unnormalised.sum(-1, keepdim=True)
        assert torch.allclose(task.ideal_logp().exp(), direct, rtol=1e-12, atol=1e-300)


def test_start_metrics_are_exact(task: DiscreteTask) -> None:
    m = task.evaluate()
    assert m["kl"] == pytest.approx(0.0, abs=1e-14)
    assert m["chosen_mass"] + m["rejected_mass"] + m["ood_mass"] == pytest.approx(1.0, rel=1e-12)
    pi = task.ref_logp.exp()
    assert m["expected_reward"] == pytest.approx((pi * task.reward).sum().item() / CFG.prompts, rel=1e-12)
    assert m["ood_implicit_reward"] == 0.0 and m["ood_implicit_corr"] == 0.0


def test_frontier_passes_through_the_ideal_policy_and_bounds_other_policies(task: DiscreteTask) -> None:
    ideal = task.evaluate(0, task.ideal_logp())
    assert task.frontier(ideal["kl"]) == pytest.approx(ideal["expected_reward"], rel=1e-9)
    # at KL 0 the bisection may stop at a λ of ~1e-30 whose KL rounds below 0
    assert task.frontier(0.0) == pytest.approx(task.evaluate()["expected_reward"], abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # random log-linear policies never beat the frontier at their own KL
        logp = (task.phi @ torch.randn(CFG.dim, generator=gen, dtype=torch.float64)).log_softmax(-1)
        m = task.evaluate(0, logp)
        assert m["expected_reward"] <= task.frontier(m["kl"]) + 1e-9
    assert best_reward_at_kl(task.ref_logp, task.reward, 1e9) == pytest.approx(task.reward.max(-1).values.mean().item())


def test_centered_corr_on_a_hand_built_case() -> None:
    b = torch.tensor([[1.0, 2.0, 3.0, 100.0], [0.0, 5.0, 1.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    shifted = 2.0 * b + torch.tensor([[10.0], [-3.0]], dtype=torch.float64)  # per-row offsets are removed
    assert centered_corr(shifted, b, mask) == pytest.approx(1.0, rel=1e-12)
    assert centered_corr(-b, b, mask) == pytest.approx(-1.0, rel=1e-12)
    a = torch.tensor([[1.0, 0.0, -1.0, 5.0], [1.0, 0.0, -1.0, 5.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, -2.0, 1.0, 0.0], [1.0, -2.0, 1.0, 0.0]], dtype=torch.float64)
    assert centered_corr(a, c, mask) == pytest.approx(0.0, abs=1e-15)  # orthogonal after centring


def test_reward_at_kl_reads_the_first_crossing() -> None:
    kl, reward = [0.0, 1.0, 3.0, 2.0, 4.0], [0.0, 2.0, 3.0, 9.0, 5.0]
    assert reward_at_kl(kl, reward, 2.0) == pytest.approx(2.5)  # between 1 and 3, not the later KL 2
    assert reward_at_kl(kl, reward, 0.0) == 0.0
    assert reward_at_kl(kl, reward, 4.0) == 5.0
    assert math.isnan(reward_at_kl(kl, reward, 4.5))
    run = {"final": {"kl": 2.0}, "curves": {"kl": [0.0, 2.0], "expected_reward": [0.0, 3.0]}}
    dpo = {"final": {"kl": 4.0}, "curves": {"kl": [0.0, 4.0], "expected_reward": [0.0, 4.0]}}
    assert matched_kl_gain(run, dpo) == (2.0, pytest.approx(1.0))  # 3 − 2 at KL 2
    assert matched_kl_gain(dpo, run) == (2.0, pytest.approx(-1.0))


def test_a_run_is_reproduced_exactly_and_starts_at_the_reference() -> None:
    runs = []
    for _ in range(2):
        task = DiscreteTask(CFG, 3, beta=1.0)
        runs.append(train(task, "prob_chosen_floor", CFG.steps, 16, CFG.lr, CFG.eval_every, 3))
    assert runs[0]["curves"] == runs[1]["curves"] and runs[0]["grads"] == runs[1]["grads"]
    curves = runs[0]["curves"]
    assert curves["step"] == [0, 10, 20, 30] and curves["kl"][0] == pytest.approx(0.0, abs=1e-14)
    assert curves["chosen_mass"][-1] > curves["chosen_mass"][0]  # β = 1: the pull-up on C wins early on
