"""A discrete response space: P prompts, K responses each, a log-linear policy, exact metrics.

Features ``φ(x, y)``, policy ``softmax_y(θᵀφ(x, y))`` with one θ shared by all responses (so
probability can move to responses never trained on), ``π_ref`` = the policy at the start θ₀, a
hidden reward ``r* = w*ᵀφ + noise``. The in-distribution set S of a prompt is the ``|S|`` responses
``π_ref`` likes most. Two ways to make pairs from S:

* ``"disjoint"`` (the main setting): the chosen set C = the best ``m`` responses of S by ``r*``, the
  rejected set R = the worst ``m``; a pair is (x, y_w ∈ C, y_l ∈ R), so no response is ever both
  chosen and rejected, and the labels are noiseless.
* ``"overlap"`` (the earlier setting, kept to measure its confound): two distinct responses of S,
  labelled by Bradley–Terry on ``r*``; most responses end up chosen in some pairs and rejected in
  others.

"Out of distribution" (OOD) means outside C ∪ R (disjoint) or outside S (overlap).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from balancer.recipes.dpo import dpo_metrics

F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Discrete:
    prompts: int = 8
    responses: int = 64
    dim: int = 16
    in_dist: int = 16  # |S|
    chosen: int = 8  # m = |C| = |R| (disjoint pairs; 2m <= |S|)
    pairs: int = 2000
    ref_logit_std: float = 1.5  # scale of θ₀ᵀφ
    reward_std: float = 2.0  # scale of w*ᵀφ
    reward_noise: float = 0.5
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-2
    eval_every: int = 20


class DiscreteTask:
    def __init__(
        self, cfg: Discrete, seed: int, beta: float, pairing: Literal["disjoint", "overlap"] = "disjoint"
    ) -> None:
        self.beta = beta
        gen = torch.Generator().manual_seed(seed)
        self.phi = torch.randn(cfg.prompts, cfg.responses, cfg.dim, generator=gen, dtype=F64)
        theta0 = torch.randn(cfg.dim, generator=gen, dtype=F64) * cfg.ref_logit_std / math.sqrt(cfg.dim)
        w_star = torch.randn(cfg.dim, generator=gen, dtype=F64) * cfg.reward_std / math.sqrt(cfg.dim)
        noise = torch.randn(cfg.prompts, cfg.responses, generator=gen, dtype=F64) * cfg.reward_noise
        self.reward = self.phi @ w_star + noise
        self.ref_logp = (self.phi @ theta0).log_softmax(-1)
        top = self.ref_logp.topk(cfg.in_dist, dim=-1).indices  # S, per prompt
        x = torch.randint(cfg.prompts, (cfg.pairs,), generator=gen)
        if pairing == "disjoint":
            by_reward = top.gather(1, self.reward.gather(1, top).argsort(dim=1, descending=True))
            best, worst = by_reward[:, : cfg.chosen], by_reward[:, -cfg.chosen :]
            w = best[x, torch.randint(cfg.chosen, (cfg.pairs,), generator=gen)]
            l = worst[x, torch.randint(cfg.chosen, (cfg.pairs,), generator=gen)]  # noqa: E741
            self.chosen_set = _mask(cfg, best)
            self.rejected_set = _mask(cfg, worst)
        else:
            a, b = (top[x, torch.randint(cfg.in_dist, (cfg.pairs,), generator=gen)] for _ in range(2))
            while bool((same := a == b).any()):  # two distinct responses per pair
                b = torch.where(same, top[x, torch.randint(cfg.in_dist, (cfg.pairs,), generator=gen)], b)
            a_wins = torch.rand(cfg.pairs, generator=gen, dtype=F64) < torch.sigmoid(
                self.reward[x, a] - self.reward[x, b]
            )
            w, l = torch.where(a_wins, a, b), torch.where(a_wins, b, a)  # noqa: E741
            self.chosen_set = torch.zeros(cfg.prompts, cfg.responses, dtype=torch.bool)
            self.chosen_set[x, w] = True
            self.rejected_set = torch.zeros_like(self.chosen_set)
            self.rejected_set[x, l] = True
        self.in_dist = _mask(cfg, top) if pairing == "overlap" else self.chosen_set | self.rejected_set
        self.x, self.w, self.l = x, w, l
        self.ref_w, self.ref_l = self.ref_logp[x, w], self.ref_logp[x, l]
        self.theta = theta0.clone().requires_grad_(True)
        self.params = [self.theta]

    def logp(self) -> Tensor:
        return (self.phi @ self.theta).log_softmax(-1)

    def pair_logps(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        logp = self.logp()
        return logp[self.x[idx], self.w[idx]], logp[self.x[idx], self.l[idx]]

    def ideal_logp(self) -> Tensor:
        """``log π*``, ``π*(y|x) ∝ π_ref(y|x) exp(r*(x, y)/β)``: the policy DPO's objective targets."""
        return gibbs_logp(self.ref_logp, self.reward, 1.0 / self.beta)

    def overlap(self) -> float:
        """Share of the chosen (prompt, response) that are also rejected in some pair."""
        return (self.chosen_set & self.rejected_set).sum().item() / self.chosen_set.sum().item()

    @torch.no_grad()
    def evaluate(self, step: int = 0, logp: Tensor | None = None) -> dict[str, float]:
        """Exact metrics of the policy ``logp`` (default: the current one)."""
        logp = self.logp() if logp is None else logp
        pi = logp.exp()
        m = dpo_metrics(logp[self.x, self.w], logp[self.x, self.l], self.ref_w, self.ref_l, beta=self.beta)
        implicit = self.beta * (logp - self.ref_logp)
        ood = ~self.in_dist
        return {
            "logp_chosen": m["logp_chosen"].item(),
            "logp_rejected": m["logp_rejected"].item(),
            "reward_margin": m["reward_margin"].item(),
            "reward_accuracy": m["reward_accuracy"].item(),
            "chosen_mass": (pi * self.chosen_set).sum(-1).mean().item(),
            "rejected_mass": (pi * self.rejected_set).sum(-1).mean().item(),
            "ood_mass": (pi * ood).sum(-1).mean().item(),
            "expected_reward": (pi * self.reward).sum(-1).mean().item(),
            "kl": (pi * (logp - self.ref_logp)).sum(-1).mean().item(),
            "ood_implicit_reward": implicit[ood].mean().item(),
            "chosen_implicit_reward": implicit[self.chosen_set].mean().item(),
            "ood_minus_chosen_implicit": implicit[ood].mean().item() - implicit[self.chosen_set].mean().item(),
            "ood_implicit_corr": centered_corr(implicit, self.reward, ood),
        }

    def frontier(self, kl: float) -> float:
        """The largest ``E_π[r*]`` of any policy with mean ``KL(π‖π_ref) <= kl`` (:func:`best_reward_at_kl`)."""
        return best_reward_at_kl(self.ref_logp, self.reward, kl)


def _mask(cfg: Discrete, index: Tensor) -> Tensor:
    return torch.zeros(cfg.prompts, cfg.responses, dtype=torch.bool).scatter_(1, index, True)


def gibbs_logp(ref_logp: Tensor, reward: Tensor, inv_temp: float) -> Tensor:
    """``log(π_ref · exp(λ r) / Z)`` per prompt (row)."""
    return (ref_logp + inv_temp * reward).log_softmax(-1)


def _kl_and_reward(ref_logp: Tensor, reward: Tensor, inv_temp: float) -> tuple[float, float]:
    logp = gibbs_logp(ref_logp, reward, inv_temp)
    pi = logp.exp()
    return (pi * (logp - ref_logp)).sum(-1).mean().item(), (pi * reward).sum(-1).mean().item()


def best_reward_at_kl(ref_logp: Tensor, reward: Tensor, kl: float) -> float:
    """Max of the mean ``E_π[r*]`` over all policies with mean ``KL(π‖π_ref) <= kl`` (rows = prompts).

    The maximiser is ``π_λ ∝ π_ref exp(λ r*)`` with one λ for every prompt (the Lagrangian of the
    constrained problem); its KL grows with λ, so λ is found by bisection. Beyond the largest
    reachable KL the answer is the reward of the per-prompt best response.
    """
    low, high = 0.0, 1.0
    while _kl_and_reward(ref_logp, reward, high)[0] < kl:
        if high > 1e6:
            return reward.max(-1).values.mean().item()
        low, high = high, 2.0 * high
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if _kl_and_reward(ref_logp, reward, mid)[0] < kl else (low, mid)
    return _kl_and_reward(ref_logp, reward, low)[1]


def centered_corr(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Pearson correlation of ``a`` and ``b`` over the masked entries, each centred per row first."""
    count = mask.sum(-1, keepdim=True).clamp_min(1)
    da = torch.where(mask, a - torch.where(mask, a, 0.0).sum(-1, keepdim=True) / count, 0.0)
    db = torch.where(mask, b - torch.where(mask, b, 0.0).sum(-1, keepdim=True) / count, 0.0)
    denom = (da.square().sum() * db.square().sum()).sqrt()
    return (da * db).sum().item() / denom.item() if denom.item() > 0 else 0.0
