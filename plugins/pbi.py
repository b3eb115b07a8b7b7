"""``pbi``: Penalty-based Boundary Intersection (Zhang & Li, MOEA/D, 2007), from the recorded losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from ._preference import ReferenceOptions, Scalarization, reference_of

__all__ = ["PBI", "PBIOptions"]


class PBIOptions(ReferenceOptions):
    """Options of :class:`PBI`."""

    theta: float = Field(5.0, ge=0.0, description="Penalty θ on the distance to the preference line (paper: 5).")
    eps: float = Field(
        1e-12, gt=0.0, description="Added under the square root of d₂, which smooths its kink (torchjd: 1e-12)."
    )


class PBI(Scalarization):
    """Minimises the losses' progress along a preference line plus θ times their distance to it (PBI).

    Zhang, Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition*, IEEE
    Transactions on Evolutionary Computation 11(6), 2007. With the groups' losses ``L``, the
    reference (ideal) point ``z*`` (option ``reference``, by group name) and the unit preference
    direction ``ŵ = r/‖r‖`` (option ``preference``, by group name; 1/k each by default)::

        f = L − z*,     d₁ = fᵀŵ,     p = f − d₁ ŵ,     d₂ = ‖p‖,     S(L) = d₁ + θ d₂

    whose gradient ``Σ_i a_i ∇L_i`` has the factors::

        a = ∂S/∂L = ŵ + θ p / d₂

    ``d₂`` is a norm with a kink where the losses lie on the preference line (always at k = 1); as
    torchjd's ``PBI``, ``d₂ = sqrt(‖p‖² + eps)`` smooths it, so there ``a = ŵ`` and rounding noise in
    ``p`` is not blown up to a unit vector. ``f`` is scaled by its largest entry first (exactly,
    with ``eps`` scaled alike), so huge and tiny losses stay finite. The paper writes
    ``d₁ = |fᵀŵ|``; it is the same while the losses are above the ideal point, as ``z*`` should make
    them. Below it, the paper's absolute value would push the losses back up to ``z*``: this plugin
    keeps ``d₁ = fᵀŵ`` (as torchjd), which descends every loss along ``ŵ``.

    Undefined cases: if a loss is unknown (``nan``: its group ran outside ``opt.backward``; the
    Balancer warns once, ``needs_losses``) or not finite, the step's factors are ``ŵ`` (θ = 0, the
    projection on the preference line) and the metric ``pbi/undefined`` is 1. Stateless. With
    incoming weights ``w`` it returns ``w * a``.

    Example::

        opt = Balancer(inner, plugins=[("pbi", {"theta": 5.0, "preference": {"math": 1.0, "code": 2.0}})])
        opt.backward({"math": loss_math, "code": loss_code})
    """

    name = "pbi"
    Options = PBIOptions
    options: PBIOptions

    def gradient(self, losses: Tensor, preference: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        opts = self.options
        shifted = losses - reference_of(opts, names, losses.device)
        scale = shifted.abs().max()
        scale = torch.where(scale > 0, scale, 1.0)
        f = shifted / scale
        direction = preference / torch.linalg.vector_norm(preference)
        along = (f * direction).sum()
        perpendicular = f - along * direction
        # p / sqrt(‖p‖² + eps) with p = scale · perpendicular: the same after dividing by scale. The
        # distance is 0 only where eps / scale² underflows and p = 0: the smoothed kink, a = ŵ there.
        distance = torch.sqrt((perpendicular * perpendicular).sum() + opts.eps / (scale * scale))
        unit = perpendicular / torch.where(distance > 0, distance, 1.0)
        return direction + opts.theta * unit, direction
