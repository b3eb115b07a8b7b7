"""``mgda``: the min-norm point of the convex hull of the group gradients (Désidéri 2012; Sener & Koltun 2018)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

from ._qp import min_norm_point

__all__ = ["MGDA", "MGDAOptions"]


class MGDAOptions(PluginOptions):
    """Options of :class:`MGDA`."""

    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        "none",
        description="Divide g_i by 1 ('none'), ‖g_i‖ ('l2'), the group's loss ('loss') or both ('loss+') "
        "before taking the min-norm point (Sener & Koltun's gradient normalisations).",
    )


class MGDA(GramWeighting[State]):
    """Multiple-gradient descent: the min-norm element of the convex hull of the gradients (Désidéri 2012).

    Désidéri, *Multiple-gradient descent algorithm (MGDA) for multiobjective optimization*
    (Comptes Rendus Mathématique 350, 2012); Sener and Koltun, *Multi-Task Learning as
    Multi-Objective Optimization* (NeurIPS 2018), which adds the gradient normalisations. The
    update is the point of the convex hull of the (normalised) gradients ``ĝ_i = g_i / n_i``
    closest to the origin, a direction that decreases every group's loss unless the point is 0
    (Pareto stationarity). With ``Ĝ = N⁻¹ G N⁻¹``::

        α = argmin_{α ≥ 0, Σ α = 1} αᵀ Ĝ α,     a_i = α_i / n_i,     direction  Σ_i a_i g_i

    ``n_i`` is 1, ``‖g_i‖``, the loss ``L_i`` or ``L_i ‖g_i‖`` (option ``normalization``); a
    factor that is zero or not finite (a zero gradient, a loss not passed to ``opt.backward``)
    counts as 1 (with ``'loss'``/``'loss+'`` the Balancer warns once when a loss was not recorded:
    ``needs_losses``). ``α`` is exact (an interior-point solve polished on its support, see
    ``plugins/_qp.py``); when 0 is in the hull (opposite gradients, or a zero gradient, which
    then takes all the weight) the direction is 0 to rounding. With incoming weights ``w`` the
    hull of the ``w_i g_i`` is used and ``w * a`` is returned.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("mgda", {"normalization": "l2"})])
    """

    name = "mgda"
    Options = MGDAOptions
    options: MGDAOptions

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]  # a property: the need depends on the options
        """Only the normalisations by the loss ('loss', 'loss+') read ``stats.losses``."""
        return self.options.normalization in ("loss", "loss+")

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        gram = stats.gram
        norm = self.options.normalization
        if norm == "none":  # n_i = 1
            return min_norm_point(gram), state
        factor = torch.ones_like(gram.diagonal())
        if norm in ("l2", "loss+"):
            factor = factor * gram.diagonal().clamp_min(0.0).sqrt()
        if norm in ("loss", "loss+"):
            factor = factor * stats.losses.to(factor)
        factor = torch.where(torch.isfinite(factor) & (factor > 0), factor, 1.0)
        alpha = min_norm_point(gram / torch.outer(factor, factor))
        return alpha / factor, state
