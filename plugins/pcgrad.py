"""``pcgrad``: projecting conflicting gradients (Yu et al., NeurIPS 2020), from the Gram matrix alone."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

from ._pairwise import to_gradient_weights, unit_cosines
from ._seeded import random_orders

__all__ = ["PCGrad", "PCGradOptions", "pcgrad_coefficients"]


class PCGradOptions(PluginOptions):
    """Options of :class:`PCGrad`."""

    seed: int = Field(0, description="Seed of the random visiting orders (with the step number and group names).")
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="Sum the projected gradients (the paper) or average them."
    )


def pcgrad_coefficients(cosines: Tensor, orders: Tensor) -> Tensor:
    """``C[i, j]``: the amount of unit vector ``u_j`` in the projected ``u_i``.

    ``cosines`` is the Gram matrix of the unit vectors, ``orders[i]`` the order in which ``u_i``
    visits the others. All rows advance together, one visit per iteration: row ``i`` never reads
    another row, so this is the paper's loop with the ``i`` loop vectorised.
    """
    coefficients = torch.eye(cosines.shape[0], dtype=cosines.dtype, device=cosines.device)
    negated = -cosines
    for visit in orders.T.unsqueeze(-1):  # [k, 1]: the group each row visits at this step
        # -<edited u_i, u_j> where it is positive (a conflict), else 0; ‖u_j‖² = 1, or 0 for a zero g_j.
        # Row i needs one entry of C @ (-cos): a dot product with row v_i of the symmetric -cos, O(k).
        conflict = (coefficients * negated[visit[:, 0]]).sum(1, keepdim=True).clamp_min(0.0)
        coefficients.scatter_add_(1, visit, conflict)
    return coefficients


class PCGrad(GramWeighting[State]):
    """Projects each gradient off the others it conflicts with, then sums (Yu et al. 2020).

    Yu, Kumar, Gupta, Levine, Hausman, Finn, *Gradient Surgery for Multi-Task Learning*, NeurIPS
    2020 (Algorithm 1). Every group gradient ``g_i`` starts as ``g_i^PC = g_i`` and visits the other
    groups ``j`` in a random order; where ``g_i^PC · g_j < 0`` it loses its component along
    ``g_j``::

        g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j            update direction  Σ_i g_i^PC

    Every ``g_i^PC`` is a linear combination ``Σ_j c_ij g_j`` of the original gradients, and every
    quantity the loop needs is a combination of Gram entries (``g_i^PC · g_j = (C G)_ij``), so the
    plugin runs the loop on the ``k×k`` matrix ``C`` and returns ``a_j = Σ_i c_ij`` (divided by
    ``k`` with ``reduction="mean"``). It runs on the cosine matrix (unit vectors) and rescales at
    the end, so gradient norms 1e-30 or 1e30 apart give the same direction; a zero gradient is
    never projected on and keeps its weight.

    Random order: drawn from ``seed``, ``stats.step`` and the group names on the host, never from
    a device RNG: identical on every rank, reproducible after a checkpoint resume, and it follows
    the groups when they are permuted. As in torchjd, ``g_i`` does not visit itself (LibMTL and
    Pytorch-PCGrad do; the results differ only if earlier projections turned ``g_i^PC`` against
    ``g_i``). With incoming weights ``w`` it projects the gradients ``w_i g_i`` and returns
    ``w * a``.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("pcgrad", {"seed": 1})])
    """

    name = "pcgrad"
    Options = PCGradOptions
    options: PCGradOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        cosines, norms = unit_cosines(stats.gram)
        orders = random_orders(stats.names, self.options.seed, stats.step, self.name, cosines.device)
        factors = to_gradient_weights(pcgrad_coefficients(cosines, orders), norms)
        if self.options.reduction == "mean":
            factors = factors / stats.num_groups
        return factors, state
