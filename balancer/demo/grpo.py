"""GRPO post-training of a tiny shared policy on several tasks, for ``balancer demo``.

The set-up of Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task LLMs* (arXiv
2510.19178), in miniature: one autoregressive policy (a GRU over digit tokens) shared by every
task, uniform task sampling (the same number of prompts per task each step), GRPO with
group-normalised advantages and a clipped probability ratio, no KL term, Adam.

Per optimizer step and task: ``prompts`` prompts, ``rollouts`` responses each. Rewards are
normalised within each prompt's group, ``Â_i = (r_i − mean r) / std r`` (a group whose rewards
are all equal, std below 1e-6, gets zero advantages). With ``ρ_t = π_θ(o_t) / π_old(o_t)`` per token::

    ℓ_i = −(1/|o_i|) Σ_t min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i)   (loss_norm="token", the default)
    ℓ_i = −Σ_t min(...)                                          (loss_norm="sequence")

and the task's loss is ``Σ_i ℓ_i / (prompts · rollouts)`` over its responses (the mean when the
task got its ``prompts``). "token" is GRPO's ``1/|o_i|`` (with equal answer lengths, the same up
to a constant as DAPO's token-level mean); "sequence" sums the token terms, so a task's gradient
grows with its answer length (as with Dr. GRPO's constant normaliser). Each rollout phase samples
``minibatches`` disjoint sets of prompts with π_old, then takes one optimizer step on each: the
first step has ρ = 1, later ones are clipped.

Each task's prompts are split in two halves captured as groups ``task/A`` and ``task/B`` whose
losses add up to the task's loss (:mod:`balancer.recipes.split_half`): the Balancer's Gram matrix then
gives the unbiased split-half estimate of ``‖E g_k‖²``, and :class:`SplitHalf` makes the plugins
weigh tasks, not halves. The parameters of a step never saw that step's prompts, so the halves
are independent given the parameters. The same split gives the estimate on the last layer alone
(the output head; Wu et al. use the last block as a proxy), ``4⟨∇_head ℓ_A, ∇_head ℓ_B⟩``, logged
as ``sq_norm_last`` next to the naive ``sq_norm_last_naive``.

Task sampling: ``sampling="uniform"`` gives every task ``prompts`` prompts per step;
``"gradient"`` is Wu et al.'s gradient-proportional sampling: the ``K·prompts`` prompts of a step
are shared out in proportion to each task's EMA (factor ``SAMPLING_BETA``) of its split-half
``‖E g_k‖²`` (negative estimates count as 0), measured at ``prompts`` prompts (a task given ``c_k``
prompts has a loss ``c_k / prompts`` times its mean's, so its estimate is scaled by
``(prompts / c_k)²``: else the allocation would feed back on itself), in pairs (one prompt per half), at least one pair
per task, by largest remainder; before the first measurement, and when no estimate is positive,
uniformly. ``"ratio_preserving"`` is MT-GRPO's sampler (:mod:`balancer.demo.mt_grpo`): the same
allocation from the ``mt_grpo`` plugin's task ratios ``z``, each task's prompts drawn until they
have non-zero advantages. With an ``mt_grpo`` plugin, rewards and improvements are reported to it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from balancer.demo.mt_grpo import find_plugin, observe_improvements, observe_rewards, ratio_preserving_rollout
from balancer.demo.tasks import DIGITS, Task, separator_token, task_token, vocab_size
from balancer.optimizer import Balancer
from balancer.recipes.split_half import SplitHalf, half_groups, split_half_sq_norms

__all__ = ["GRPOConfig", "Policy", "Rollouts", "prompt_counts", "rollout", "task_losses", "train"]

LossNorm = Literal["sequence", "token"]
Sampling = Literal["uniform", "gradient", "ratio_preserving"]
MIN_REWARD_STD = 1e-6
SAMPLING_BETA = 0.9


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Sizes and hyperparameters of one training run."""

    steps: int = 600
    prompts: int = 8
    """Prompts per task per optimizer step (even: half go to group ``task/A``, half to ``task/B``)."""
    rollouts: int = 8
    """Responses sampled per prompt (GRPO's group size G)."""
    minibatches: int = 2
    """Optimizer steps per rollout phase, each on its own prompts."""
    clip: float = 0.2
    lr: float = 2e-3
    hidden: int = 64
    loss_norm: LossNorm = "token"
    sampling: Sampling = "uniform"

    def __post_init__(self) -> None:
        if self.prompts < 2 or self.prompts % 2:
            raise ValueError(f"`prompts` must be even and >= 2 (two halves). Found `prompts = {self.prompts}`.")
        if self.rollouts < 2:
            raise ValueError(f"`rollouts` must be >= 2 (advantages are normalised per group). Found {self.rollouts}.")
        if self.loss_norm not in ("sequence", "token"):
            raise ValueError(f"`loss_norm` must be 'sequence' or 'token'. Found `{self.loss_norm!r}`.")
        if self.sampling not in ("uniform", "gradient", "ratio_preserving"):
            raise ValueError(
                f"`sampling` must be 'uniform', 'gradient' or 'ratio_preserving'. Found `{self.sampling!r}`."
            )


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
    head_grads: list[Tensor] = []
    clipped = entropy_sum = 0.0
    head = list(policy.head.parameters())
    for rows in halves:
        logp, entropy = _token_logprobs(policy, batch.context[rows], batch.responses[rows])
        ratio = torch.exp(logp - batch.old_logp[rows])
        advantage = batch.advantages[rows].unsqueeze(1)
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * advantage)
        per_response = surrogate.sum(dim=1) if cfg.loss_norm == "sequence" else surrogate.mean(dim=1)
        loss = -per_response.sum() / (cfg.prompts * cfg.rollouts)
        losses.append(loss)
        grads = torch.autograd.grad(loss, head, retain_graph=True)
        head_grads.append(torch.cat([g.reshape(-1) for g in grads]).double())
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
        "sq_norm_last": float(4.0 * head_grads[0] @ head_grads[1]),
        "sq_norm_last_naive": float((head_grads[0] + head_grads[1]).square().sum()),
        "prompts": float(n // cfg.rollouts),
    }
    return (losses[0], losses[1]), info


def prompt_counts(sq_norms: Sequence[float], prompts: int) -> list[int]:
    """Prompts per task for gradient-proportional sampling (see the module docstring).

    ``sq_norms``: each task's EMA of ``‖E g_k‖²``. The counts are even, at least 2, and add up
    to ``len(sq_norms) · prompts``.
    """
    k = len(sq_norms)
    positive = [max(v, 0.0) if math.isfinite(v) else 0.0 for v in sq_norms]
    total = sum(positive)
    pairs = k * prompts // 2
    if total <= 0:
        return [prompts] * k
    spare = pairs - k  # one pair per task first
    shares = [spare * v / total for v in positive]
    extra = [math.floor(x) for x in shares]
    order = sorted(range(k), key=lambda j: extra[j] - shares[j])  # largest remainder first
    for j in order[: spare - sum(extra)]:
        extra[j] += 1
    return [2 * (1 + e) for e in extra]


def train(
    tasks: Sequence[Task],
    plugins: Sequence[Any],
    cfg: GRPOConfig,
    seed: int,
    on_step: Callable[[Balancer, int, dict[str, dict[str, float]]], None],
    *,
    half_plugins: Sequence[Any] = (),
) -> None:
    """Trains a fresh policy for ``cfg.steps`` steps; ``on_step(opt, step, extra)`` after each step.

    ``plugins`` weigh tasks (inside :class:`SplitHalf`); ``half_plugins`` run after them on the
    halves themselves (``task_norm`` with ``estimate="split_half"``). ``extra`` maps each
    statistic of :func:`task_losses` to ``{task: value}``. The same seed gives the same initial
    policy and the same prompts and samples (until the runs' policies differ).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = Policy(vocab_size(len(tasks)), cfg.hidden)
    opt = Balancer(torch.optim.Adam(policy.parameters(), lr=cfg.lr), plugins=[SplitHalf(plugins), *half_plugins])
    ema: list[float] | None = None
    mt = find_plugin(opt)
    if cfg.sampling == "ratio_preserving" and mt is None:
        raise ValueError("sampling='ratio_preserving' reads the task ratios of an 'mt_grpo' plugin: add one.")
    step = 0
    while step < cfg.steps:
        counts = [cfg.prompts] * len(tasks)
        if cfg.sampling == "gradient" and ema is not None:
            counts = prompt_counts(ema, cfg.prompts)
        drawn = [[float(c) for c in counts] for _ in range(cfg.minibatches)]
        if cfg.sampling == "ratio_preserving" and mt is not None:
            z = mt.probabilities(opt)
            counts = prompt_counts([float(z[t.name]) if t.name in z else 1.0 / len(tasks) for t in tasks], cfg.prompts)
            draw = functools.partial(rollout, policy)
            phase = []
            for m in range(min(cfg.minibatches, cfg.steps - step)):
                pairs = [
                    ratio_preserving_rollout(draw, opt, tasks, i, c, cfg.rollouts, generator)
                    for i, c in enumerate(counts)
                ]
                phase.append([b for b, _ in pairs])
                drawn[m] = [float(n) for _, n in pairs]
        else:
            phase = [
                [rollout(policy, tasks, i, counts[i], cfg.rollouts, generator) for i in range(len(tasks))]
                for _ in range(min(cfg.minibatches, cfg.steps - step))
            ]
            if mt is not None:
                for batch in phase:
                    observe_rewards(opt, {t.name: float(b.rewards.mean()) for t, b in zip(tasks, batch, strict=True)})
        for m, batch in enumerate(phase):
            losses: dict[str, Tensor] = {}
            extra: dict[str, dict[str, float]] = {}
            for task, rollouts in zip(tasks, batch, strict=True):
                pair, info = task_losses(policy, rollouts, cfg)
                losses.update(zip(half_groups(task.name), pair, strict=True))
                for key, value in info.items():
                    extra.setdefault(key, {})[task.name] = value
            opt.backward(losses)
            opt.step()
            if mt is not None:
                scale = cfg.prompts * cfg.rollouts  # a task's loss is its Σ_i ℓ_i / scale
                before = {t.name: float(sum(losses[g].detach() for g in half_groups(t.name))) * scale for t in tasks}
                observe_improvements(opt, policy, tasks, batch, before, cfg)
                extra["generated"] = dict(zip((t.name for t in tasks), drawn[m], strict=True))
                extra["z"] = {name: float(v) for name, v in mt.probabilities(opt).items()}
            if opt.last_stats is not None:
                # per prompt share: a task's loss grows with its prompt count, its mean gradient does not
                measured = split_half_sq_norms(opt.last_stats).tolist()
                now = [v * (cfg.prompts / c) ** 2 for v, c in zip(measured, counts, strict=True)]
                ema = (
                    now
                    if ema is None
                    else [SAMPLING_BETA * e + (1 - SAMPLING_BETA) * v for e, v in zip(ema, now, strict=True)]
                )
            opt.zero_grad()
            on_step(opt, step, extra)
            step += 1
