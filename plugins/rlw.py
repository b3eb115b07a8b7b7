"""``rlw``: Random Loss Weighting (Lin et al., TMLR 2022), seeded and reproducible."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

from ._seeded import group_normals

__all__ = ["RLW", "RLWOptions"]


class RLWOptions(PluginOptions):
    """Options of :class:`RLW`."""

    seed: int = Field(0, description="Seed of the random weights (with the step number and group names).")
    std: float = Field(1.0, gt=0.0, description="Standard deviation of the normal samples (paper: 1).")


class RLW(GramWeighting[State]):
    """Random weights every step: the softmax of standard normal samples (Lin et al. 2022).

    Lin, Ye, Zhang, Tsang, *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022 (arXiv 2111.10603). Each step draws ``ε_i ~ N(0, std²)`` per
    group and weights the losses (hence the gradients) by::

        a = softmax(ε),      Σ_i a_i = 1

    the paper's default (normal) distribution, as in LibMTL. It reads neither the losses nor the
    gradients, so unknown losses do not matter. The samples come from CPU ``torch.Generator`` s
    seeded by ``seed``, ``stats.step`` and each group's name: every rank draws the same weights
    without communicating, a resumed run draws what the uninterrupted one would have, and
    permuting the groups permutes the weights. With incoming weights ``w`` it returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("rlw", {"seed": 3})])
    """

    name = "rlw"
    Options = RLWOptions
    options: RLWOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        samples = group_normals(stats.names, self.options.seed, stats.step, self.name, stats.gram.device)
        return torch.softmax(self.options.std * samples, dim=0), state
