"""``crmogm``: CR-MOGM (Zhou et al., NeurIPS 2022), an EMA over steps of the weights of the plugins before it."""

from __future__ import annotations

import warnings
from typing import Any, TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, Plugin, PluginOptions
from balancer.contract.plugin import InvalidStateError
from balancer.errors import BalancerWarning

from ._named import ByName, gather_by_name, scatter_by_name

__all__ = ["CRMOGM", "CRMOGMOptions", "CRMOGMState"]


class CRMOGMState(TypedDict):
    """State of :class:`CRMOGM`."""

    weights: ByName  # group name -> its smoothed weight λ after the last step it took part in
    steps: int  # updates so far
    varied: Tensor  # 0-d: 1.0 once an incoming weight differed from 1 (the EMA had something to smooth)


class CRMOGMOptions(PluginOptions):
    """Options of :class:`CRMOGM`."""

    alpha: float = Field(0.9, gt=0.0, le=1.0, description="EMA coefficient α on the previous weights (1 freezes "
                         "them at λ₀; 0, no smoothing, is refused: drop the plugin instead).")  # fmt: skip
    initial: dict[str, float] = Field(
        default_factory=dict,
        description="λ₀ of named groups; a group not named here starts from its first incoming weight.",
    )


class CRMOGM(Plugin[CRMOGMState]):
    """Smooths the weights of the plugins before it by an EMA across steps (CR-MOGM).

    Zhou et al., *On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond*, NeurIPS 2022: the weights ``λ̂_t`` that a gradient
    manipulation method (MGDA, UPGrad, ...) computes from one stochastic batch are replaced by::

        λ_t = α λ_{t-1} + (1 - α) λ̂_t,        λ_0 = λ̂_1 (or ``initial``)

    so the first step returns ``λ̂_1`` whatever ``α``. How this fits the plugin chain
    (:class:`~balancer.contract.chain.Chain`): each plugin receives the weights returned by the one
    before (ones for the first) and returns weights of the *original* group gradients, so the
    incoming weights of this plugin are ``λ̂_t`` and it returns ``λ_t`` in their place (it does
    not multiply them, unlike the aggregators). It belongs right after the plugin(s) it smooths:
    ``plugins=["mgda", ("crmogm", {"alpha": 0.9})]`` is torchjd 0.18's
    ``CRMOGMWeighting(MGDAWeighting(), alpha=0.9)`` (tested).

    Placed first it would receive ones at every step and return ones: the Balancer refuses that
    order when it is built (:attr:`needs_earlier_plugin`). Later in the list it may still receive
    ones only (after a plugin whose weights are all 1); reading the weights on the host every step
    would synchronise with an accelerator, so the state tracks on the device whether any incoming
    weight ever differed from 1; :meth:`metrics` (read when metrics are logged) reports it as
    ``smoothing`` and warns (:class:`~balancer.errors.BalancerWarning`) while it is still 0.

    Groups are matched by name: a group seen before continues its EMA, a new group starts from
    its weight ``initial[name]`` or else from its incoming weight (its own ``λ_0 = λ̂``), and a group
    absent from a step keeps its last ``λ`` until it returns. Methods whose weights are
    normalised over the present groups (MGDA's sum to 1) then mix weights normalised over
    different sets: the paper assumes a fixed set of objectives. ``α`` is fixed (the paper's
    Corollary 1 lets ``α_t`` grow towards 1 as the learning rate decays; torchjd leaves that to
    a setter).

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["mgda", ("crmogm", {"alpha": 0.9})])
        ...
        opt.step()
    """

    name = "crmogm"
    Options = CRMOGMOptions
    options: CRMOGMOptions

    @property
    def needs_earlier_plugin(self) -> bool:
        """True: it averages the weights of the plugins before it."""
        return True

    def init(self) -> CRMOGMState:
        return CRMOGMState(weights={}, steps=0, varied=torch.tensor(0.0, dtype=torch.float64))

    def check_state(self, state: CRMOGMState) -> None:
        """The structure, one 0-d float tensor per stored group name, a count and a flag in range."""
        super().check_state(state)
        for name, value in state["weights"].items():
            if not isinstance(name, str) or not isinstance(value, Tensor) or value.dim() != 0:
                raise InvalidStateError(
                    f"weights.{name}", f"found {value!r}; expected a group name mapped to a 0-d tensor"
                )
            if not value.is_floating_point():
                raise InvalidStateError(f"weights.{name}", f"found a {value.dtype} tensor; expected a float tensor")
        if state["steps"] < 0:
            raise InvalidStateError("steps", f"found {state['steps']}; this count cannot be negative")
        if state["varied"].dim() != 0 or not bool(((state["varied"] == 0) | (state["varied"] == 1)).all()):
            raise InvalidStateError("varied", f"found {state['varied']!r}; expected a 0-d tensor holding 0.0 or 1.0")

    def update(self, stats: GroupStats, weights: Tensor, state: CRMOGMState) -> tuple[Tensor, CRMOGMState]:
        names, alpha = list(stats.names), self.options.alpha
        stored = {n: v for n, v in state["weights"].items()}
        for name in names:  # λ_0 of a new group: `initial`, else its first incoming weight (λ = λ̂ this step)
            if name not in stored and name in self.options.initial:
                stored[name] = torch.tensor(self.options.initial[name], dtype=torch.float64)
        previous = gather_by_name(stored, names, weights)
        smoothed = alpha * previous + (1.0 - alpha) * weights
        varied = torch.maximum(state["varied"].to(weights.device), (weights != 1.0).any().to(weights.dtype))
        new_state = CRMOGMState(
            weights=scatter_by_name(state["weights"], names, smoothed), steps=state["steps"] + 1, varied=varied
        )
        return smoothed, new_state

    def metrics(self, state: CRMOGMState) -> dict[str, Any]:
        """``smoothing``: 1.0 once an incoming weight differed from 1; warns while it is 0 after a step."""
        if state["steps"] > 0 and not bool(state["varied"]):
            warnings.warn(
                f"crmogm received weights all equal to 1 in each of its {state['steps']} steps, so it smoothed "
                "nothing. It smooths the weights of the plugins before it: place it after them, e.g. "
                'plugins=["mgda", ("crmogm", {"alpha": 0.9})].',
                BalancerWarning,
                stacklevel=2,
            )
        return {"smoothing": state["varied"]}
