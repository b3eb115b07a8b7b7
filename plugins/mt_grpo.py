"""``mt_grpo``: MT-GRPO's improvement-aware task weights (Ramesh et al., arXiv 2602.05547), from reported rewards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._adam import StepRule, descend
from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = ["MTGRPO", "MTGRPOOptions", "MTGRPOState", "observe_state"]

Values = Mapping[str, float | Tensor]


class MTGRPOOptions(PluginOptions):
    """Options of :class:`MTGRPO` (defaults: the paper's main runs, ``scripts/exp-1/main/run_mt-grpo_0.2.sh``)."""

    lr: float = Field(0.025, ge=0.0, description="Learning rate of the task logits (main runs: 0.025).")
    gamma: float = Field(1e-5, ge=0.0, description="Weight decay of the logits (Adam's weight_decay; main runs: 1e-5).")
    reward_weight: float = Field(
        0.2, ge=0.0, description="λ: weight of the task's reward J_k next to its improvement (main runs: 0.2)."
    )
    reward_decay: float = Field(
        0.5, ge=0.0, lt=1.0, description="EMA factor of each task's reported reward, J_k (main runs: 0.5)."
    )
    improvement_clip: float = Field(
        0.1, gt=0.0, description="I_k is clipped to [-c, c] (the code: 0.1 at training lr 1e-6, scaled with the lr)."
    )
    optimizer: StepRule = Field("adam", description="Step on the logits: Adam (official code) or plain descent.")
    apply: Literal["weights", "sampling"] = Field(
        "weights",
        description="'weights': the loss weights K·z_k; 'sampling': weights 1, z read by a task sampler "
        "(MTGRPO.probabilities), as the paper uses it.",
    )


class MTGRPOState(TypedDict):
    """State of :class:`MTGRPO`: one entry per task seen, over ``names``."""

    names: list[str]  # every task seen so far, in order of first appearance
    logits: Tensor  # [m] the task logits; z = softmax(logits)
    reward: Tensor  # [m] J_k, the EMA of the reported rewards (0 before one is reported, as the code)
    exp_avg: Tensor  # [m] Adam's first moment
    exp_avg_sq: Tensor  # [m] Adam's second moment
    steps: Tensor  # [m] Adam's step count


def _vector(values: Values, names: list[str], fill: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """``([m] values over names, [m] bool: given)`` from a name -> value mapping."""
    given = torch.tensor([n in values for n in names], dtype=torch.bool).to(like.device)
    entries = [torch.as_tensor(values.get(n, fill), dtype=torch.float64).to(like.device) for n in names]
    return torch.stack(entries).reshape(len(names)), given


def observe_state(
    state: MTGRPOState, options: MTGRPOOptions, rewards: Values | None = None, improvements: Values | None = None
) -> MTGRPOState:
    """The state after one observation: rewards enter the EMA ``J``, then improvements take a logit step.

    ``J_k ← β J_k + (1-β) r_k`` for each task in ``rewards``. With ``improvements``, every task's
    ``δ_k = clip(I_k, ±c) + λ J_k`` (``I_k = 0`` for a task not in ``improvements``), and the logits
    take one step on the gradient of ``zᵀδ``, ``z ⊙ (δ - zᵀδ)``, plus ``γ ξ``.
    """
    new_names = [n for n in (*(rewards or {}), *(improvements or {})) if n not in state["names"]]
    like = state["logits"]
    named = NamedIndex(state["names"], list(dict.fromkeys(new_names)), like.device)
    full = {
        key: named.vector(state[key], 0.0, like.device)
        for key in ("logits", "reward", "exp_avg", "exp_avg_sq", "steps")
    }
    names = named.names
    if rewards:
        r, given = _vector(rewards, names, 0.0, like)
        beta = options.reward_decay
        full["reward"] = torch.where(given, beta * full["reward"] + (1.0 - beta) * r, full["reward"])
    if improvements is not None and names:
        c = options.improvement_clip
        gain, _ = _vector(improvements, names, 0.0, like)
        delta = gain.clamp(-c, c) + options.reward_weight * full["reward"]
        logits = full["logits"]
        z = torch.softmax(logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + options.gamma * logits
        stepped = descend(
            options.optimizer, options.lr, logits, grad, full["exp_avg"], full["exp_avg_sq"], full["steps"]
        )
        full.update(zip(("logits", "exp_avg", "exp_avg_sq", "steps"), stepped, strict=True))
    return MTGRPOState(names=names, **full)  # type: ignore[typeddict-item]


class MTGRPO(GramWeighting[MTGRPOState]):
    """Weighs tasks toward the one with the lowest reward that improves least (Ramesh et al. 2026).

    Ramesh, Ji, Zimmer, Yoon, Wang, Bou Ammar, Lucchi, Bogunovic, *Multi-Task GRPO: Reliable LLM
    Reasoning Across Tasks*, arXiv 2602.05547 (code: github.com/rsshyam/MT-GRPO). Task weights
    ``z = softmax(ξ)`` follow a relaxed max-min objective: ``z`` descends on ``Σ_k z_k δ_k`` with::

        δ_k = clip(I_k, -c, c) + λ J_k,        ∇_ξ (zᵀδ) = z ⊙ (δ - zᵀδ)

    where ``I_k`` is task k's improvement in the last step (the official code: the decrease of the
    task's summed policy loss on the step's batch, ``L_k(θ_t) - L_k(θ_{t+1})``, measured again after
    the step) and ``J_k`` an EMA (factor ``reward_decay``) of the task's batch accuracy (its mean
    reward). ``ξ`` takes an Adam step (weight decay ``gamma``) per observation, so a task that scores
    low and improves little gains weight. The paper uses ``z`` as *task sampling ratios*, with a
    ratio-preserving sampler that keeps drawing until each task's share of the prompts with a
    non-zero advantage equals ``z_k``; a Balancer plugin can only weigh: ``apply="weights"``
    returns ``K z_k / Σ_present z`` (a batch with shares ``z`` has loss ``Σ z_k L̄_k``: uniform mixing
    times ``K z_k``), ``apply="sampling"`` returns the incoming weights unchanged and a sampler reads
    :meth:`probabilities` (``balancer.demo`` has one).

    Rewards and improvements are not in the stats: report them on every rank, with the same
    numbers (gathered over ranks), with :meth:`observe`; tasks never reported keep ``ξ = 0``,
    ``J = 0``. Deviations from the official code: one step per :meth:`observe` call (the code takes
    one per mini-batch of the step, the user calls it as often), per-task Adam step counts. The
    code's unused options (masks, decay variants, bandits) are left out.

    Example::

        opt = Balancer(torch.optim.AdamW(model.parameters()), plugins=["mt_grpo"])
        MTGRPO.observe(opt, rewards={"math": 0.4, "code": 0.1}, improvements={"math": 0.02, "code": 0.0})
    """

    name = "mt_grpo"
    Options = MTGRPOOptions
    options: MTGRPOOptions

    def init(self) -> MTGRPOState:
        empty = torch.zeros(0, dtype=torch.float64)
        return MTGRPOState(
            names=[],
            logits=empty,
            reward=empty.clone(),
            exp_avg=empty.clone(),
            exp_avg_sq=empty.clone(),
            steps=empty.clone(),
        )

    def check_state(self, state: MTGRPOState) -> None:
        """One entry per stored name; Adam's second moments and step counts are not negative."""
        super().check_state(state)
        check_named_state(state, vectors=("logits", "reward", "exp_avg", "exp_avg_sq", "steps"))
        check_nonnegative(state["exp_avg_sq"], "exp_avg_sq")
        check_nonnegative(state["steps"], "steps")

    def weigh(self, stats: GroupStats, state: MTGRPOState) -> tuple[Tensor, MTGRPOState]:
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        full = {
            key: named.vector(state[key], 0.0, device) for key in ("logits", "reward", "exp_avg", "exp_avg_sq", "steps")
        }
        z = named.take(torch.softmax(full["logits"], dim=0))
        factors = z * (stats.num_groups / z.sum())
        if self.options.apply == "sampling":
            factors = torch.ones_like(factors)
        return factors, MTGRPOState(names=named.names, **full)  # type: ignore[typeddict-item]

    def metrics(self, state: MTGRPOState) -> dict[str, object]:
        """The task weights ``z`` and the rewards ``J`` over every task seen, by name."""
        z = torch.softmax(state["logits"], dim=0)
        out: dict[str, object] = {f"z/{n}": z[i] for i, n in enumerate(state["names"])}
        out.update({f"reward/{n}": state["reward"][i] for i, n in enumerate(state["names"])})
        return out

    @classmethod
    def _located(cls, opt: Any) -> list[tuple[str, str | None, MTGRPO]]:
        """``(top-level plugin name, inner name or None, plugin)`` of every MTGRPO in ``opt``, nested
        plugins (``SplitHalf``'s) included."""
        found: list[tuple[str, str | None, MTGRPO]] = []
        for plugin in opt.plugins:
            if isinstance(plugin, cls):
                found.append((plugin.name, None, plugin))
            for inner in getattr(plugin, "inner", ()):
                if isinstance(inner, cls):
                    found.append((plugin.name, inner.name, inner))
        if not found:
            raise ValueError(f"This Balancer has no mt_grpo plugin (plugins: {list(opt.plugins)}). Add 'mt_grpo'.")
        return found

    @classmethod
    def observe(cls, opt: Any, *, rewards: Values | None = None, improvements: Values | None = None) -> None:
        """Reports task rewards (into ``J``) and/or improvements (one logit step) to every mt_grpo
        plugin of the Balancer ``opt``. Call on every rank with the same numbers."""
        for top, inner, plugin in cls._located(opt):

            def change(state: Any, plugin: MTGRPO = plugin, inner: str | None = inner) -> Any:
                if inner is None:
                    return observe_state(state, plugin.options, rewards, improvements)
                return {**state, inner: observe_state(state[inner], plugin.options, rewards, improvements)}

            opt.update_plugin_state(top, change)

    @classmethod
    def probabilities(cls, opt: Any) -> dict[str, Tensor]:
        """``z`` of the (first) mt_grpo plugin of ``opt``, by task name (empty before any task is seen)."""
        top, inner, _ = cls._located(opt)[0]
        state = opt.plugin_states[top] if inner is None else opt.plugin_states[top][inner]
        z = torch.softmax(state["logits"], dim=0)
        return {n: z[i] for i, n in enumerate(state["names"])}
