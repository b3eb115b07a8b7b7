"""The shared mechanics of plugins that learn one scalar per group from its loss (``uncertainty``, ``imtl_l``).

Such a method minimises ``Σ_i f(s_i) L_i + h(s_i)`` jointly over the model and the group scalars
``s``: the model's gradient is ``Σ_i f(s_i) ∇L_i`` (the factors), and ``s`` descends
``f'(s_i) L_i + h'(s_i)``. Here ``s`` lives in the plugin state, keyed by group name, and takes its
own step (Adam or plain gradient descent, :mod:`._adam`) after the factors are read, from this
step's losses; nothing is added to the user's optimizer. A subclass gives ``f`` and the derivative.

Missing losses: a group whose loss is unknown this step (``nan``; the Balancer warns once,
``needs_losses``) keeps its ``s`` and moments and is weighted by its current ``s``. A group absent
from a step keeps its entries; a new group starts at the option ``init``.
"""

from __future__ import annotations

import abc
from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._adam import StepRule, descend
from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = ["LossScaleOptions", "LossScaleState", "LossScaling"]


class LossScaleOptions(PluginOptions):
    """Options of a learned per-group loss scale."""

    lr: float = Field(1e-4, ge=0.0, description="Learning rate of the group scalars (LibMTL: the model's Adam).")
    init: float = Field(0.0, description="Initial value of a new group's scalar.")
    optimizer: StepRule = Field("adam", description="Step on the group scalars: Adam, or plain s ← s - lr ∂L/∂s.")


class LossScaleState(TypedDict):
    """One entry per group seen, over ``names``."""

    names: list[str]  # every group seen so far, in order of first appearance
    scalar: Tensor  # [m] s
    exp_avg: Tensor  # [m] Adam's first moment of ∂L/∂s
    exp_avg_sq: Tensor  # [m] Adam's second moment
    steps: Tensor  # [m] Adam's step count


class LossScaling(GramWeighting[LossScaleState]):
    """Base of the plugins that learn ``s`` in ``Σ_i f(s_i) L_i + h(s_i)`` (module docs)."""

    options: LossScaleOptions
    needs_losses = True

    @abc.abstractmethod
    def factors(self, scalar: Tensor) -> Tensor:
        """``f(s)``: the factors of the group gradients."""

    @abc.abstractmethod
    def scalar_gradient(self, scalar: Tensor, losses: Tensor) -> Tensor:
        """``f'(s) L + h'(s)``: the gradient of the objective at ``s``."""

    def init(self) -> LossScaleState:
        empty = torch.zeros(0, dtype=torch.float64)
        return LossScaleState(
            names=[], scalar=empty, exp_avg=empty.clone(), exp_avg_sq=empty.clone(), steps=empty.clone()
        )

    def check_state(self, state: LossScaleState) -> None:
        """One entry per stored name; Adam's second moments and step counts are not negative."""
        super().check_state(state)
        check_named_state(state, vectors=("scalar", "exp_avg", "exp_avg_sq", "steps"))
        check_nonnegative(state["exp_avg_sq"], "exp_avg_sq")
        check_nonnegative(state["steps"], "steps")

    def weigh(self, stats: GroupStats, state: LossScaleState) -> tuple[Tensor, LossScaleState]:
        opts = self.options
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        full = {
            "scalar": named.vector(state["scalar"], opts.init, device),
            **{key: named.vector(state[key], 0.0, device) for key in ("exp_avg", "exp_avg_sq", "steps")},
        }
        now = {key: named.take(value) for key, value in full.items()}
        losses = stats.losses.to(torch.float64)
        known = torch.isfinite(losses)
        grad = self.scalar_gradient(now["scalar"], torch.where(known, losses, 0.0))
        stepped = descend(opts.optimizer, opts.lr, now["scalar"], grad, now["exp_avg"], now["exp_avg_sq"], now["steps"])
        new = {
            key: named.put(full[key], torch.where(known, value, now[key]))
            for key, value in zip(("scalar", "exp_avg", "exp_avg_sq", "steps"), stepped, strict=True)
        }
        return self.factors(now["scalar"]), LossScaleState(names=named.names, **new)  # type: ignore[typeddict-item]
