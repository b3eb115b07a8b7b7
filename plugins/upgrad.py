"""``upgrad``: project every group gradient onto the dual cone, then average (Quinton & Rey 2024)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, Plugin, PluginOptions, State

from ._gram import weighted_gram
from ._qp import solve_nonneg_qp, trace_normalised

__all__ = ["UPGrad", "UPGradOptions"]


class UPGradOptions(PluginOptions):
    """Options of :class:`UPGrad`."""

    reg_eps: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Adds reg_eps·I to the trace-normalised Gram before projecting (torchjd uses 1e-4); "
        "0 projects exactly.",
    )


class UPGrad(Plugin):
    """Unconflicting projection of gradients: each g_i projected onto the dual cone, averaged (Quinton & Rey 2024).

    Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization* (arXiv 2406.16232,
    2024). The dual cone of the group gradients is ``{x : g_jᵀx ≥ 0 for all j}``, the directions
    that conflict with no group. UPGrad projects every ``g_i`` onto it and averages the
    projections, so the update never increases a group's loss to first order and its norm stays
    that of a mean. In terms of the Gram matrix ``G = A Aᵀ`` (Proposition 1 of the paper), the
    projection of ``Aᵀu`` is ``Aᵀv`` with ``v = argmin_{v ≥ u} vᵀ G v``, so::

        v_i = argmin_{v ≥ e_i} vᵀ G v            (one nonnegative QP per group, solved as a batch)
        a   = (1/k) Σ_i v_i,        direction  Σ_j a_j g_j

    ``G`` is divided by its trace first (the weights do not depend on the gradients' scale);
    ``reg_eps`` adds ``reg_eps·I`` after that, as torchjd's default projector does with 1e-4.
    A zero gradient keeps its mean weight ``1/k``, which multiplies nothing. With incoming
    weights ``w`` (earlier plugins), the gradients ``w_i g_i`` are projected and ``w * a`` is
    returned.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["upgrad"])
    """

    name = "upgrad"
    version = "1"
    Options = UPGradOptions
    options: UPGradOptions

    def update(self, stats: GroupStats, weights: Tensor, state: State) -> tuple[Tensor, State]:
        gram = trace_normalised(weighted_gram(stats.gram, weights))
        k = gram.shape[0]
        gram = gram + self.options.reg_eps * torch.eye(k, dtype=gram.dtype, device=gram.device)
        # v_i = e_i + x_i with x_i ≥ 0 minimising ½ xᵀGx + (G e_i)ᵀx: row i of G is problem i's linear term.
        shifts = solve_nonneg_qp(gram, gram)
        return weights * (1.0 + shifts.sum(0)) / k, state
