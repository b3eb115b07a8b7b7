"""``dwa``: Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019), per step from the recorded losses."""

from __future__ import annotations

from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._named import NamedIndex, check_named_state

__all__ = ["DWA", "DWAOptions", "DWAState"]


class DWAState(TypedDict):
    """State of :class:`DWA`: the last two (smoothed) losses of every group seen, over ``names``."""

    names: list[str]  # every group seen so far, in order of first appearance
    last: Tensor  # [m] the most recent loss; NaN before one is recorded
    before: Tensor  # [m] the one before it; NaN before two are recorded


class DWAOptions(PluginOptions):
    """Options of :class:`DWA`."""

    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature T; larger is more uniform (paper: 2).")
    beta: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="EMA factor of each group's loss before the ratio (0: raw per-step losses; "
        "e.g. 0.9 to approach the paper's epoch averages).",
    )


class DWA(GramWeighting[DWAState]):
    """Weights groups by how slowly their loss has been falling (Liu, Johns, Davison 2019).

    Liu, Johns, Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019 (Dynamic
    Weight Average). With ``L_i(t)`` group ``i``'s loss at step ``t`` and ``K`` the number of
    groups::

        r_i = L_i(t-1) / L_i(t-2),      a_i = K exp(r_i / T) / Σ_j exp(r_j / T)

    so the factors sum to ``K`` and a group whose loss fell least gets the most weight. The paper
    uses epoch-average losses (and weights the first two epochs equally); this plugin uses the
    losses of the two most recent steps that recorded one for the group (``stats.losses``, from
    ``opt.backward({...})``), optionally smoothed by an EMA (``beta``) since per-step losses are
    noisy. Like the paper it reads only past losses: step ``t`` is weighted from steps ``t-1`` and
    ``t-2``, and the current loss enters the history afterwards.

    Missing history: until every group of the step has two recorded losses with a finite ratio
    (the first two steps, a new group, a loss of zero, or ``nan`` losses of groups that ran outside
    ``opt.backward``; the Balancer warns once, ``needs_losses``), the factors are all 1, the paper's
    own rule for its first epochs; a loss not known yet is NaN in the state. State:
    the last two (smoothed) losses of every group seen, keyed by ``names``; a group absent from a
    step keeps them. With incoming weights ``w`` the plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("dwa", {"temperature": 2.0})])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "dwa"
    Options = DWAOptions
    options: DWAOptions
    needs_losses = True
    nonfinite_state = {"last": "nan", "before": "nan"}  # NaN: fewer than two losses recorded for that group

    def init(self) -> DWAState:
        empty = torch.zeros(0, dtype=torch.float64)
        return DWAState(names=[], last=empty, before=empty.clone())

    def check_state(self, state: DWAState) -> None:
        """One entry of ``last`` and ``before`` per stored name."""
        super().check_state(state)
        check_named_state(state, vectors=("last", "before"))

    def weigh(self, stats: GroupStats, state: DWAState) -> tuple[Tensor, DWAState]:
        opts = self.options
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        last_full = named.vector(state["last"], float("nan"), device)
        before_full = named.vector(state["before"], float("nan"), device)
        last, before = named.take(last_full), named.take(before_full)

        usable = torch.isfinite(last) & torch.isfinite(before) & (before != 0)
        ratio = torch.where(usable, last / torch.where(usable, before, 1.0), 0.0)
        usable = usable & torch.isfinite(ratio)
        softmax = stats.num_groups * torch.softmax(torch.where(usable, ratio, 0.0) / opts.temperature, dim=0)
        factors = torch.where(usable.all(), softmax, torch.ones_like(softmax))

        losses = stats.losses.to(torch.float64)
        seen = torch.isfinite(losses)
        smoothed = torch.where(torch.isfinite(last), opts.beta * last + (1.0 - opts.beta) * losses, losses)
        new_state = DWAState(
            names=named.names,
            last=named.put(last_full, torch.where(seen, smoothed, last)),
            before=named.put(before_full, torch.where(seen, last, before)),
        )
        return factors, new_state
