"""``famo``: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023), from the recorded losses."""

from __future__ import annotations

from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._adam import StepRule, descend
from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = ["FAMO", "FAMOOptions", "FAMOState"]


class FAMOOptions(PluginOptions):
    """Options of :class:`FAMO`."""

    lr: float = Field(0.025, ge=0.0, description="Learning rate of the logits (the paper's β; 0.025 in the paper).")
    gamma: float = Field(1e-3, ge=0.0, description="Decay of the logits (the paper's γ, Adam's weight_decay).")
    min_loss: float | dict[str, float] = Field(
        0.0, description="Lower bound b of each group's loss (one value, or one per group name; missing names: 0)."
    )
    eps: float = Field(
        1e-8, gt=0.0, lt=1e-2, description="Added to ℓ - b before the logarithm, as in the paper's code."
    )
    optimizer: StepRule = Field(
        "adam", description="Step on the logits: Adam (official code, torchjd) or plain ξ ← ξ - lr (δ + γ ξ) (Alg. 1)."
    )


class FAMOState(TypedDict):
    """State of :class:`FAMO`: one entry per group seen, over ``names``."""

    names: list[str]  # every group seen so far, in order of first appearance
    logits: Tensor  # [m] ξ
    log_loss: Tensor  # [m] the last log(ℓ - b + eps); NaN before a loss is recorded
    exp_avg: Tensor  # [m] Adam's first moment of the logits' gradient
    exp_avg_sq: Tensor  # [m] Adam's second moment
    steps: Tensor  # [m] Adam's step count


class FAMO(GramWeighting[FAMOState]):
    """Decreases every group's loss at the same relative rate, from the losses alone (Liu et al. 2023).

    Liu, Feng, Stone, Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023. With
    logits ``ξ`` (state), ``z = softmax(ξ)`` and ``ℓ̃_i = ℓ_i - b_i + eps`` (``b = min_loss``),
    the update direction is the gradient of ``c Σ_i z_i log ℓ̃_i``::

        d = Σ_i a_i g_i,     a_i = c z_i / ℓ̃_i,     c = (Σ_j z_j / ℓ̃_j)⁻¹

    and the logits learn from how much each log loss fell: with ``δ_i = log ℓ̃_i(prev) - log
    ℓ̃_i(now)``, the gradient of ``zᵀδ`` is ``J_softmax(ξ)ᵀ δ = z ⊙ (δ - zᵀδ)``, and ``ξ`` takes an
    Adam step on it with weight decay ``gamma`` (the official code and torchjd), or the plain step
    ``ξ ← ξ - lr (Jᵀδ + γ ξ)`` of the paper's Algorithm 1 (``optimizer="sgd"``).

    Steps instead of an extra forward pass: the paper measures ``δ`` on the same batch after the
    update, which costs one more forward. Here ``δ`` is the change between the losses of two
    consecutive steps (``stats.losses``, recorded by ``opt.backward({...})``), so at step ``t`` the
    logits first learn from ``ℓ(t-1) → ℓ(t)``, then weight step ``t``. This is what torchjd's
    ``FAMO.update`` computes when it is given the next step's losses; on mini-batches ``δ`` also
    contains the batch-to-batch noise.

    Missing losses: a group whose loss this step is unknown (``nan``: it ran outside
    ``opt.backward``), non-finite or not above ``min_loss`` contributes ``δ_i = 0`` and keeps its
    previous loss for the next ``δ``; if any group of the step lacks a loss, the step's factors are
    ``a = z`` (FAMO with all losses equal: the same scale, no NaN), and the Balancer warns once
    (``needs_losses``). The unknown log losses are kept as NaN in the state. State: ``ξ``, the last log
    loss and the Adam moments of every group seen so far, keyed by ``names``; a group absent from
    a step keeps its entries, a new group starts at ``ξ_i = 0``. With incoming weights ``w`` the
    plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.AdamW(model.parameters()), plugins=[("famo", {"min_loss": 0.0})])
        opt.backward({"math": loss_math, "code": loss_code})  # the losses FAMO needs
    """

    name = "famo"
    Options = FAMOOptions
    options: FAMOOptions
    needs_losses = True
    nonfinite_state = {"log_loss": "nan"}  # NaN: no loss recorded yet for that group

    def init(self) -> FAMOState:
        empty = torch.zeros(0, dtype=torch.float64)
        return FAMOState(
            names=[],
            logits=empty,
            log_loss=empty.clone(),
            exp_avg=empty.clone(),
            exp_avg_sq=empty.clone(),
            steps=empty.clone(),
        )

    def check_state(self, state: FAMOState) -> None:
        """One entry per stored name; Adam's second moments and step counts are not negative."""
        super().check_state(state)
        check_named_state(state, vectors=("logits", "log_loss", "exp_avg", "exp_avg_sq", "steps"))
        check_nonnegative(state["exp_avg_sq"], "exp_avg_sq")
        check_nonnegative(state["steps"], "steps")

    def _min_losses(self, names: tuple[str, ...], device: torch.device) -> Tensor | float:
        bound = self.options.min_loss
        if isinstance(bound, float | int):
            return float(bound)
        return torch.tensor([float(bound.get(n, 0.0)) for n in names], dtype=torch.float64).to(device)

    def weigh(self, stats: GroupStats, state: FAMOState) -> tuple[Tensor, FAMOState]:
        opts = self.options
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        full = {key: named.vector(state[key], 0.0, device) for key in ("logits", "exp_avg", "exp_avg_sq", "steps")}
        full["log_loss"] = named.vector(state["log_loss"], float("nan"), device)
        logits, previous = named.take(full["logits"]), named.take(full["log_loss"])

        shifted = stats.losses.to(torch.float64) - self._min_losses(stats.names, device) + opts.eps
        valid = torch.isfinite(shifted) & (shifted > 0)
        log_now = torch.where(valid, torch.where(valid, shifted, 1.0).log(), torch.nan)
        seen = valid & torch.isfinite(previous)
        delta = torch.where(seen, previous - log_now, 0.0)
        z = torch.softmax(logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + opts.gamma * logits
        learn = seen.any()

        new = dict(full)
        take = named.take
        stepped, *moments = descend(
            opts.optimizer, opts.lr, logits, grad, take(full["exp_avg"]), take(full["exp_avg_sq"]), take(full["steps"])
        )
        for key, value in zip(("exp_avg", "exp_avg_sq", "steps"), moments, strict=True):
            new[key] = named.put(full[key], torch.where(learn, value, take(full[key])))
        logits = torch.where(learn, stepped, logits)
        new["logits"] = named.put(full["logits"], logits)
        new["log_loss"] = named.put(full["log_loss"], torch.where(valid, log_now, previous))

        z = torch.softmax(logits, dim=0)
        ratio = z / torch.where(valid, shifted, 1.0)
        factors = torch.where(valid.all(), ratio / ratio.sum(), z)
        return factors, FAMOState(names=named.names, **new)  # type: ignore[typeddict-item]

    def metrics(self, state: FAMOState) -> dict[str, object]:
        """The task weights ``z = softmax(ξ)`` over every group seen, by name."""
        if not state["names"]:
            return {}
        z = torch.softmax(state["logits"], dim=0)
        return {f"z/{name}": z[i] for i, name in enumerate(state["names"])}
