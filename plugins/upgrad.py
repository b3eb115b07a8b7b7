"""``upgrad``: project every group gradient onto the dual cone, then average (Quinton & Rey 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from balancer import GroupStats, State
from balancer.contract.weighting import GramWeighting

from ._dual_cone import DualConeOptions, project_onto_dual_cone

__all__ = ["UPGrad", "UPGradOptions"]


class UPGradOptions(DualConeOptions):
    """Options of :class:`UPGrad`."""


class UPGrad(GramWeighting[State]):
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
    Options = UPGradOptions
    options: UPGradOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        gram = stats.gram
        k = gram.shape[0]
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        projections = project_onto_dual_cone(gram, eye, self.options.reg_eps)  # row i: v_i, a batch of k QPs
        return projections.mean(0), state
