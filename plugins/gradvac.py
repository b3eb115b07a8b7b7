"""``gradvac``: Gradient Vaccine (Wang et al., ICLR 2021), pairwise cosine targets from the Gram matrix."""

from __future__ import annotations

from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.plugin import InvalidStateError
from balancer.contract.weighting import GramWeighting

from ._named import NamedIndex, check_named_state
from ._pairwise import to_gradient_weights, unit_cosines
from ._seeded import random_orders

__all__ = ["GradVac", "GradVacOptions", "GradVacState", "gradvac_coefficients"]


class GradVacState(TypedDict):
    """State of :class:`GradVac`."""

    names: list[str]  # every group seen so far, in order of first appearance
    targets: Tensor  # [m, m] cosine targets φ̂ over `names`


class GradVacOptions(PluginOptions):
    """Options of :class:`GradVac`."""

    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="EMA rate of the cosine targets: φ̂ ← (1-β) φ̂ + β φ (LibMTL, torchjd: 0.5)."
    )
    eps: float = Field(1e-8, gt=0.0, lt=1e-2, description="Added to the denominator √(1-φ̂²) (targets near ±1).")
    seed: int = Field(0, description="Seed of the random visiting orders (with the step number and group names).")


def gradvac_coefficients(
    cosines: Tensor, targets: Tensor, orders: Tensor, beta: float, eps: float
) -> tuple[Tensor, Tensor]:
    """``(C, new_targets)``: ``C[i, j]`` is the amount of unit vector ``u_j`` in the edited ``u_i``.

    ``cosines`` is the Gram matrix of the unit vectors (zero rows for zero gradients), ``targets``
    the ``k×k`` EMA targets ``φ̂_ij``, ``orders[i]`` the order in which ``u_i`` visits the others.
    Row ``i`` only reads and writes row ``i`` of ``C`` and of the targets, so all rows advance
    together, one visit per iteration.
    """
    k = cosines.shape[0]
    present = cosines.diagonal() > 0
    coefficients = torch.eye(k, dtype=cosines.dtype, device=cosines.device)
    products = cosines.clone()  # C @ cos, row i: <edited u_i, u_j> for every j; kept up to date in O(k²)
    for step in range(orders.shape[1]):
        visit = orders[:, step : step + 1]
        norm = (products * coefficients).sum(1).clamp_min(0.0).sqrt()
        valid = present & present.gather(0, visit[:, 0]) & (norm > 0)
        phi = torch.where(valid, products.gather(1, visit)[:, 0] / torch.where(valid, norm, 1.0), 0.0)
        phi = phi.clamp(-1.0, 1.0)
        target = targets.gather(1, visit)[:, 0]
        root_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        root_target = (1.0 - target * target).clamp_min(0.0).sqrt()
        amount = norm * (target * root_phi - phi * root_target) / (root_target + eps)
        added = torch.where(valid & (phi < target), amount, 0.0)
        coefficients = coefficients.scatter_add(1, visit, added[:, None])
        products = products + added[:, None] * cosines[visit[:, 0]]  # C_i += a_i e_v  =>  (C cos)_i += a_i cos_v
        moved = torch.where(valid, (1.0 - beta) * target + beta * phi, target)
        targets = targets.scatter(1, visit, moved[:, None])
    return coefficients, targets


class GradVac(GramWeighting[GradVacState]):
    """Pulls each pair of gradients towards an EMA of their past cosine (Wang et al. 2021).

    Wang, Tsvetkov, Firat, Cao, *Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models*, ICLR 2021. Every group gradient starts as
    ``g_i' = g_i`` and visits the other groups ``j`` in a random order. With ``φ_ij`` the cosine of
    ``g_i'`` and ``g_j`` and ``φ̂_ij`` the target, where ``φ_ij < φ̂_ij``::

        g_i' ← g_i' + ‖g_i'‖ (φ̂_ij √(1-φ_ij²) − φ_ij √(1-φ̂_ij²)) / (‖g_j‖ √(1-φ̂_ij²)) · g_j

    which sets the cosine of ``g_i'`` and ``g_j`` to ``φ̂_ij``; then ``φ̂_ij ← (1-β) φ̂_ij + β φ_ij``
    at every visit (as torchjd does; LibMTL 1.1.5 updates the target only when it edits). The
    update direction is ``Σ_i g_i'``. As in PCGrad, every ``g_i'`` is a combination
    ``Σ_j c_ij g_j`` whose norms and dot products are Gram entries, so the loop runs on ``k×k``
    matrices (of unit vectors, rescaled at the end) and the plugin returns ``a_j = Σ_i c_ij``.
    With incoming weights ``w`` it edits the gradients ``w_i g_i`` and returns ``w * a``.

    State: the targets ``φ̂`` (``targets``, ``m×m``) of every pair of groups seen so far, over the
    group names in ``names``, so it follows the groups by name whatever order they arrive in.
    A group seen for the first time starts at ``φ̂ = 0`` against every other (the paper's start).
    A group absent from a step keeps its targets unchanged until it returns; so does a pair
    involving a zero gradient (its cosine is undefined: no edit, no EMA update). Groups are never
    forgotten, so the state grows with the number of distinct group names.

    The random visiting order comes from ``seed``, ``stats.step`` and the group names, as in
    ``pcgrad``: the same on every rank and after a resume.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("gradvac", {"beta": 0.01})])
    """

    name = "gradvac"
    Options = GradVacOptions
    options: GradVacOptions

    def init(self) -> GradVacState:
        return GradVacState(names=[], targets=torch.zeros(0, 0, dtype=torch.float64))

    def check_state(self, state: GradVacState) -> None:
        """An ``m×m`` matrix of cosine targets in [-1, 1] over the ``m`` stored names."""
        super().check_state(state)
        check_named_state(state, matrices=("targets",))
        outside = state["targets"].abs() > 1.0
        if bool(outside.any()):
            i, j = (int(x) for x in outside.nonzero()[0])
            found = state["targets"][i, j].item()
            raise InvalidStateError(f"targets[{i}, {j}]", f"found {found}; a cosine target lies in [-1, 1]")

    def weigh(self, stats: GroupStats, state: GradVacState) -> tuple[Tensor, GradVacState]:
        opts = self.options
        device = stats.gram.device
        cosines, norms = unit_cosines(stats.gram)
        named = NamedIndex(state["names"], stats.names, device)
        full = named.matrix(state["targets"], 0.0, device)
        orders = random_orders(stats.names, opts.seed, stats.step, self.name, device)
        coefficients, targets = gradvac_coefficients(cosines, named.take_matrix(full), orders, opts.beta, opts.eps)
        new_state = GradVacState(names=named.names, targets=named.put_matrix(full, targets))
        return to_gradient_weights(coefficients, norms), new_state

    def metrics(self, state: GradVacState) -> dict[str, object]:
        """The mean cosine target over pairs of distinct groups."""
        targets = state["targets"]
        m = targets.shape[0]
        if m < 2:
            return {}
        return {"mean_target": (targets.sum() - targets.diagonal().sum()) / (m * (m - 1))}
