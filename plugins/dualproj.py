"""``dualproj``: project the mean gradient onto the dual cone (Quinton & Rey 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from balancer import GroupStats, State
from balancer.contract.weighting import GramWeighting

from ._dual_cone import DualConeOptions, project_onto_dual_cone

__all__ = ["DualProj", "DualProjOptions"]


class DualProjOptions(DualConeOptions):
    """Options of :class:`DualProj`."""


class DualProj(GramWeighting[State]):
    """Projects the mean gradient onto the dual cone of the group gradients (Quinton & Rey 2024).

    Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization* (arXiv 2406.16232,
    2024), where it is the baseline next to UPGrad; the same projection solves Equation 11 of
    Lopez-Paz and Ranzato, *Gradient Episodic Memory for Continual Learning* (NeurIPS 2017).
    The mean ``g_0 = (1/k) Σ g_i`` is projected onto ``{x : g_jᵀx ≥ 0 for all j}``. With the
    Gram matrix ``G``, the projection of ``Aᵀu`` is ``Aᵀv`` with::

        a = argmin_{v ≥ u} vᵀ G v,   u = (1/k, …, 1/k),     direction  Σ_j a_j g_j

    ``G`` is divided by its trace first; ``reg_eps`` adds ``reg_eps·I`` after that (torchjd's
    default projector uses 1e-4). With incoming weights ``w`` the mean of the ``w_i g_i`` is
    projected and ``w * a`` is returned.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["dualproj"])
    """

    name = "dualproj"
    Options = DualProjOptions
    options: DualProjOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        gram = stats.gram
        k = gram.shape[0]
        mean = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        return project_onto_dual_cone(gram, mean, self.options.reg_eps), state
