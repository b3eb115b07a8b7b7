"""MT-GRPO's side of ``balancer demo``: the ratio-preserving sampler and the plugin's feedback.

Ramesh et al., *Multi-Task GRPO: Reliable LLM Reasoning Across Tasks* (arXiv 2602.05547). The
``mt_grpo`` plugin learns task ratios ``z`` from rewards and improvements; the paper uses them to
*sample* tasks, with a ratio-preserving sampler (RP-sampler). This module is that part, found
through the Balancer's plugins (the core never imports ``plugins/``):

- :func:`ratio_preserving_rollout`: a task's prompts are drawn in rounds; prompts whose responses
  all got the same reward (zero advantages, no gradient) are rejected, until the task has its
  target number of informative prompts or ``RP_ROUNDS`` rounds were drawn (the official code's
  ``max_num_gen_batches = 10``); a task still short keeps rejected prompts in the empty places
  (they add nothing to the loss, whose normaliser is fixed: the same as leaving them out). The
  targets are ``prompt_counts(z)``, the allocation of gradient-proportional sampling;
- :func:`observe_rewards` after each round (the code updates its accuracy EMA on every generation
  batch) and :func:`observe_improvements` after each optimizer step: the decrease of each task's
  summed per-response GRPO loss on the step's batch, ``L_k(θ_t) - L_k(θ_{t+1})``, measured by one
  more forward pass, as the official code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from balancer.demo.tasks import Task

__all__ = ["RP_ROUNDS", "find_plugin", "observe_improvements", "observe_rewards", "ratio_preserving_rollout"]

RP_ROUNDS = 10
PLUGIN = "mt_grpo"


def find_plugin(opt: Any, name: str = PLUGIN) -> Any | None:
    """The plugin ``name`` of the Balancer ``opt``, at the top level or inside ``SplitHalf``; None if absent."""
    for plugin in opt.plugins:
        for candidate in (plugin, *getattr(plugin, "inner", ())):
            if candidate.name == name:
                return candidate
    return None


def observe_rewards(opt: Any, rewards: dict[str, float]) -> None:
    """Reports mean rewards of freshly drawn prompts to the mt_grpo plugin (its EMA ``J``)."""
    plugin = find_plugin(opt)
    if plugin is not None:
        plugin.observe(opt, rewards=rewards)


def _select(batch: Any, prompts: Tensor, group: int) -> Any:
    rows = (prompts[:, None] * group + torch.arange(group)).reshape(-1)
    fields = {f: getattr(batch, f).index_select(0, rows) for f in ("context", "responses", "old_logp", "rewards")}
    advantages = batch.advantages.index_select(0, rows)
    zero = (advantages.view(-1, group).abs().sum(dim=1) == 0).to(torch.float32).mean()
    return type(batch)(**fields, advantages=advantages, zero_variance=zero)


def _concat(batches: Sequence[Any]) -> Any:
    fields = ("context", "responses", "old_logp", "rewards", "advantages")
    joined = {f: torch.cat([getattr(b, f) for b in batches]) for f in fields}
    return type(batches[0])(**joined, zero_variance=torch.tensor(0.0))


def ratio_preserving_rollout(
    draw: Any, opt: Any, tasks: Sequence[Task], index: int, target: int, group: int, generator: torch.Generator
) -> tuple[Any, int]:
    """``(rollouts of target prompts, prompts drawn)`` for ``tasks[index]``, in a random order.

    ``draw(tasks, index, n, group, generator)`` samples ``n`` fresh prompts (``rollout`` bound to the policy).
    """
    kept: list[Any] = []
    rejected: list[Any] = []
    have = drawn = 0
    for _ in range(RP_ROUNDS):
        batch = draw(tasks, index, target, group, generator)
        drawn += target
        observe_rewards(opt, {tasks[index].name: float(batch.rewards.mean())})
        informative = batch.advantages.view(target, group).abs().sum(dim=1) > 0
        take = torch.nonzero(informative).flatten()[: target - have]
        kept.append(_select(batch, take, group))
        rejected.append(_select(batch, torch.nonzero(~informative).flatten(), group))
        have += int(take.numel())
        if have == target:
            break
    pool = _concat(kept + rejected)
    # a random order: the halves A and B (first and second half of the prompts) stay exchangeable
    return _select(pool, torch.randperm(target, generator=generator), group), drawn


def _summed_response_losses(policy: Any, batch: Any, clip: float, loss_norm: str) -> float:
    """``Σ_i ℓ_i`` over the batch's responses, ``ℓ_i`` the per-response clipped surrogate loss."""
    from balancer.demo.grpo import _token_logprobs

    with torch.no_grad():
        logp, _ = _token_logprobs(policy, batch.context, batch.responses)
        ratio = torch.exp(logp - batch.old_logp)
        advantage = batch.advantages.unsqueeze(1)
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
        per_response = surrogate.sum(dim=1) if loss_norm == "sequence" else surrogate.mean(dim=1)
        return float(-per_response.sum())


def observe_improvements(
    opt: Any, policy: Any, tasks: Sequence[Task], batch: Sequence[Any], before: dict[str, float], cfg: Any
) -> None:
    """After a step: ``I_k = L_k(before) - L_k(after)`` on the step's batch, reported to the mt_grpo plugin.

    ``before``: each task's summed per-response loss at the parameters the step's gradient was taken at.
    """
    plugin = find_plugin(opt)
    if plugin is None:
        return
    after = {
        t.name: _summed_response_losses(policy, b, cfg.clip, cfg.loss_norm) for t, b in zip(tasks, batch, strict=True)
    }
    plugin.observe(opt, improvements={name: before[name] - after[name] for name in after})
