"""``uncertainty``: uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018), learned log-variances."""

from __future__ import annotations

from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._adam import StepRule, descend
from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = ["Uncertainty", "UncertaintyOptions", "UncertaintyState"]


class UncertaintyOptions(PluginOptions):
    """Options of :class:`Uncertainty`."""

    lr: float = Field(
        1e-4, ge=0.0, description="Learning rate of the log-variances (LibMTL: the model's Adam, 1e-4 by default)."
    )
    init: float = Field(-0.5, description="Initial log-variance s = log σ² of a new group (LibMTL: -0.5).")
    optimizer: StepRule = Field("adam", description="Step on the log-variances: Adam, or plain s ← s - lr ∂L/∂s.")


class UncertaintyState(TypedDict):
    """State of :class:`Uncertainty`: one entry per group seen, over ``names``."""

    names: list[str]  # every group seen so far, in order of first appearance
    log_var: Tensor  # [m] s = log σ²
    exp_avg: Tensor  # [m] Adam's first moment of ∂L/∂s
    exp_avg_sq: Tensor  # [m] Adam's second moment
    steps: Tensor  # [m] Adam's step count


class Uncertainty(GramWeighting[UncertaintyState]):
    """Weights each group by its learned homoscedastic uncertainty (Kendall, Gal, Cipolla 2018).

    Kendall, Gal, Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
    and Semantics*, CVPR 2018. Each group has a learned log-variance ``s_i = log σ_i²`` and the
    objective is (the paper's Gaussian-likelihood form, eq. 7, as LibMTL's ``UW`` implements it)::

        L = Σ_i ( L_i / (2 exp(s_i)) + s_i / 2 )

    so the gradient of the model is ``Σ_i a_i ∇L_i`` with ``a_i = 1 / (2 exp(s_i))``, and the
    log-variances descend ``∂L/∂s_i = 1/2 - L_i / (2 exp(s_i))``, whose fixed point is ``σ_i² = L_i``:
    a group with a large loss gets a small weight. The paper's classification form (``1/σ²`` on a
    softmax loss, eq. 10) differs by a factor 2 in the weight and is not offered.

    Explicit state instead of parameters: ``s`` lives in the plugin state and takes its own step
    (``optimizer``, ``lr``) after weighting, from this step's losses (``stats.losses``, recorded by
    ``opt.backward({...})``); nothing is added to the user's optimizer. LibMTL puts ``s`` into the
    model's optimizer: with the same Adam settings (``lr``, no weight decay) the two agree step for
    step. The weights of step ``t`` use ``s`` before its update, as there.

    Missing losses: a group whose loss is unknown this step (``nan``; the Balancer warns once,
    ``needs_losses``) keeps its ``s`` and Adam moments, and is weighted by its current ``s``. State
    is keyed by ``names``; a group absent from a step keeps its entries, a new group starts at
    ``init``. With incoming weights ``w`` the plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-4), plugins=[("uncertainty", {"lr": 1e-4})])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "uncertainty"
    Options = UncertaintyOptions
    options: UncertaintyOptions
    needs_losses = True

    def init(self) -> UncertaintyState:
        empty = torch.zeros(0, dtype=torch.float64)
        return UncertaintyState(
            names=[], log_var=empty, exp_avg=empty.clone(), exp_avg_sq=empty.clone(), steps=empty.clone()
        )

    def check_state(self, state: UncertaintyState) -> None:
        """One entry per stored name; Adam's second moments and step counts are not negative."""
        super().check_state(state)
        check_named_state(state, vectors=("log_var", "exp_avg", "exp_avg_sq", "steps"))
        check_nonnegative(state["exp_avg_sq"], "exp_avg_sq")
        check_nonnegative(state["steps"], "steps")

    def weigh(self, stats: GroupStats, state: UncertaintyState) -> tuple[Tensor, UncertaintyState]:
        opts = self.options
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        full = {
            "log_var": named.vector(state["log_var"], opts.init, device),
            **{key: named.vector(state[key], 0.0, device) for key in ("exp_avg", "exp_avg_sq", "steps")},
        }
        now = {key: named.take(value) for key, value in full.items()}
        scale = torch.exp(-now["log_var"]) / 2.0  # a_i = 1 / (2 σ_i²)
        losses = stats.losses.to(torch.float64)
        known = torch.isfinite(losses)
        grad = 0.5 - torch.where(known, losses, 0.0) * scale
        stepped = descend(
            opts.optimizer, opts.lr, now["log_var"], grad, now["exp_avg"], now["exp_avg_sq"], now["steps"]
        )
        new = {
            key: named.put(full[key], torch.where(known, value, now[key]))
            for key, value in zip(("log_var", "exp_avg", "exp_avg_sq", "steps"), stepped, strict=True)
        }
        return scale, UncertaintyState(names=named.names, **new)  # type: ignore[typeddict-item]

    def metrics(self, state: UncertaintyState) -> dict[str, object]:
        """Each group's learned variance ``σ² = exp(s)``, by name."""
        return {f"sigma2/{name}": state["log_var"][i].exp() for i, name in enumerate(state["names"])}
