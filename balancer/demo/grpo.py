"""GRPO post-training of a tiny shared policy on several tasks, for ``balancer demo``.

The set-up of Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task LLMs* (arXiv
2510.19178), in miniature: one autoregressive policy (a GRU over digit tokens) shared by every
task, uniform task sampling (the same number of prompts per task each step), GRPO with
group-normalised advantages and a clipped probability ratio, no KL term, Adam.

Per optimizer step and task: ``prompts`` prompts, ``rollouts`` responses each. Rewards are
normalised within each prompt's group, ``Â_i = (r_i − mean r) / std r`` (a group whose rewards
are all equal, std below 1e-6, gets zero advantages). With ``ρ_t = π_θ(o_t) / π_old(o_t)`` per token::

    ℓ_i = −Σ_t min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i)         (loss_norm="sequence", the default)
    ℓ_i = −(1/|o_i|) Σ_t min(...)                             (loss_norm="token", GRPO's 1/|o_i|)

and the task's loss is the mean of ``ℓ_i`` over its responses. "sequence" sums the token terms,
so a task's gradient grows with its answer length (as with Dr. GRPO's constant normaliser);
"token" averages them. Each rollout phase samples ``minibatches`` disjoint sets of prompts with
π_old, then takes one optimizer step on each: the first step has ρ = 1, later ones are clipped.

Each task's prompts are split in two halves captured as groups ``task/A`` and ``task/B`` whose
losses add up to the task's loss (:mod:`balancer.recipes.split_half`): the Balancer's Gram matrix then
gives the unbiased split-half estimate of ``‖E g_k‖²``, and :class:`SplitHalf` makes the plugins
weigh tasks, not halves. The parameters of a step never saw that step's prompts, so the halves
are independent given the parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from balancer.demo.tasks import DIGITS, Task, separator_token, task_token, vocab_size
from balancer.optimizer import Balancer
from balancer.recipes.split_half import SplitHalf, half_groups

__all__ = ["GRPOConfig", "Policy", "Rollouts", "rollout", "task_losses", "train"]

LossNorm = Literal["sequence", "token"]
MIN_REWARD_STD = 1e-6


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Sizes and hyperparameters of one training run."""

    steps: int = 1200
    prompts: int = 8
    """Prompts per task per optimizer step (even: half go to group ``task/A``, half to ``task/B``)."""
    rollouts: int = 8
    """Responses sampled per prompt (GRPO's group size G)."""
    minibatches: int = 2
    """Optimizer steps per rollout phase, each on its own prompts."""
    clip: float = 0.2
    lr: float = 2e-3
    hidden: int = 64
    loss_norm: LossNorm = "sequence"

    def __post_init__(self) -> None:
        if self.prompts < 2 or self.prompts % 2:
            raise ValueError(f"`prompts` must be even and >= 2 (two halves). Found `prompts = {self.prompts}`.")
        if self.rollouts < 2:
            raise ValueError(f"`rollouts` must be >= 2 (advantages are normalised per group). Found {self.rollouts}.")
        if self.loss_norm not in ("sequence", "token"):
            raise ValueError(f"`loss_norm` must be 'sequence' or 'token'. Found `{self.loss_norm!r}`.")


class Policy(nn.Module):
    """Embedding -> one GRU layer -> logits over the ten digits."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, DIGITS)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, state = self.gru(self.embed(tokens), state)
        return self.head(out), state


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """One task's sampled responses, ``prompts · rollouts`` rows in prompt-major order."""

    context: Tensor
    """``[n, prompt_len + 2]``: task token, prompt, separator."""
    responses: Tensor
    """``[n, answer_len]`` sampled digits."""
    old_logp: Tensor
    """``[n, answer_len]`` log-probabilities under the sampling policy π_old."""
    rewards: Tensor
    advantages: Tensor
    zero_variance: Tensor
    """Fraction of prompts whose responses all got the same reward (zero advantages)."""


def _token_logprobs(policy: Policy, context: Tensor, responses: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the response tokens and the policy's entropy at each of them."""
    inputs = torch.cat([context, responses[:, :-1]], dim=1)
    logits, _ = policy(inputs)
    logprobs = torch.log_softmax(logits[:, context.shape[1] - 1 :], dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logprobs.gather(-1, responses.unsqueeze(-1)).squeeze(-1), entropy


@torch.no_grad()
def rollout(
    policy: Policy, tasks: Sequence[Task], index: int, prompts: int, group: int, generator: torch.Generator
) -> Rollouts:
    """Samples ``group`` responses for each of ``prompts`` fresh prompts of ``tasks[index]``."""
    task = tasks[index]
    drawn = task.draw(prompts, generator).repeat_interleave(group, dim=0)
    n = drawn.shape[0]
    context = torch.cat(
        [torch.full((n, 1), task_token(index)), drawn, torch.full((n, 1), separator_token(len(tasks)))], dim=1
    )
    logits, state = policy(context)
    tokens: list[Tensor] = []
    for t in range(task.answer_len):
        token = torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1, generator=generator)
        tokens.append(token)
        if t + 1 < task.answer_len:
            logits, state = policy(token, state)
    responses = torch.cat(tokens, dim=1)
    old_logp, _ = _token_logprobs(policy, context, responses)
    rewards = task.reward(drawn, responses)
    grouped = rewards.view(prompts, group)
    std = grouped.std(dim=1, keepdim=True)
    # Equal rewards can leave a rounding-level std; such a group has no signal: zero advantages.
    spread = std > MIN_REWARD_STD
    advantages = torch.where(spread, (grouped - grouped.mean(dim=1, keepdim=True)) / std.clamp_min(MIN_REWARD_STD), 0.0)
    zero_variance = (~spread).to(torch.float32).mean()
    return Rollouts(context, responses, old_logp, rewards, advantages.reshape(-1), zero_variance)


def task_losses(policy: Policy, batch: Rollouts, cfg: GRPOConfig) -> tuple[tuple[Tensor, Tensor], dict[str, float]]:
    """The two halves' GRPO losses (they add up to the task's loss) and the batch's statistics."""
    n = batch.responses.shape[0]
    halves = (slice(0, n // 2), slice(n // 2, n))
    losses: list[Tensor] = []
    clipped = entropy_sum = 0.0
    for rows in halves:
        logp, entropy = _token_logprobs(policy, batch.context[rows], batch.responses[rows])
        ratio = torch.exp(logp - batch.old_logp[rows])
        advantage = batch.advantages[rows].unsqueeze(1)
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * advantage)
        per_response = surrogate.sum(dim=1) if cfg.loss_norm == "sequence" else surrogate.mean(dim=1)
        losses.append(-per_response.sum() / n)
        clipped += float(((ratio - 1).abs() > cfg.clip).sum())
        entropy_sum += float(entropy.detach().sum())
    tokens = batch.responses.numel()
    info = {
        "reward": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std()),
        "abs_advantage": float(batch.advantages.abs().mean()),
        "zero_variance_groups": float(batch.zero_variance),
        "entropy": entropy_sum / tokens,
        "clip_fraction": clipped / tokens,
    }
    return (losses[0], losses[1]), info


def train(
    tasks: Sequence[Task],
    plugins: Sequence[Any],
    cfg: GRPOConfig,
    seed: int,
    on_step: Callable[[Balancer, int, dict[str, dict[str, float]]], None],
) -> None:
    """Trains a fresh policy for ``cfg.steps`` steps; ``on_step(opt, step, extra)`` after each step.

    ``extra`` maps each statistic of :func:`task_losses` to ``{task: value}``. The same seed gives
    the same initial policy and the same prompts and samples (until the runs' policies differ).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = Policy(vocab_size(len(tasks)), cfg.hidden)
    opt = Balancer(torch.optim.Adam(policy.parameters(), lr=cfg.lr), plugins=[SplitHalf(plugins)])
    step = 0
    while step < cfg.steps:
        phase = [
            [rollout(policy, tasks, i, cfg.prompts, cfg.rollouts, generator) for i in range(len(tasks))]
            for _ in range(min(cfg.minibatches, cfg.steps - step))
        ]
        for batch in phase:
            losses: dict[str, Tensor] = {}
            extra: dict[str, dict[str, float]] = {}
            for task, rollouts in zip(tasks, batch, strict=True):
                pair, info = task_losses(policy, rollouts, cfg)
                losses.update(zip(half_groups(task.name), pair, strict=True))
                for key, value in info.items():
                    extra.setdefault(key, {})[task.name] = value
            opt.backward(losses)
            opt.step()
            opt.zero_grad()
            on_step(opt, step, extra)
            step += 1
