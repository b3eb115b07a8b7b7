"""``cosmos``: the COSMOS scalarization (Ruchte & Grabocka, ICDM 2021), from the recorded losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from ._preference import PreferenceOptions, Scalarization

__all__ = ["COSMOS", "COSMOSOptions"]


class COSMOSOptions(PreferenceOptions):
    """Options of :class:`COSMOS`."""

    lambda_: float = Field(
        1.0, ge=0.0, description="Weight λ of the cosine penalty (0: linear scalarization; paper: 0.01 to 8)."
    )


class COSMOS(Scalarization):
    """Minimises the preference-weighted losses, rewarding losses aligned with the preference (COSMOS).

    Ruchte, Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective Learning*,
    ICDM 2021 (arXiv:2103.13392). With the groups' losses ``L``, the preference ``r`` (option
    ``preference``, by group name; 1/k each by default) and ``λ = lambda_``, the objective is::

        S(L) = rᵀL − λ cos(r, L),       cos(r, L) = rᵀL / (‖r‖ ‖L‖)

    whose gradient ``Σ_i a_i ∇L_i`` has the factors, with ``r̂ = r/‖r‖``, ``L̂ = L/‖L‖``::

        a = ∂S/∂L = r − (λ / ‖L‖) (r̂ − cos(r, L) L̂)

    The penalty's part is orthogonal to ``L``: it turns the loss vector toward the preference
    direction, and a factor can be negative (a group whose share of the losses is above its
    preference is pushed up). ``L`` is scaled by its largest entry first, so huge and tiny losses
    stay finite. The paper also feeds ``r`` to the model and samples it afresh (Dirichlet) at every
    step to learn the whole Pareto front; here ``r`` is a fixed option (as torchjd's ``COSMOS``, which
    leaves resampling and conditioning to the user).

    Undefined cases: if a loss is unknown (``nan``: its group ran outside ``opt.backward``; the
    Balancer warns once, ``needs_losses``) or not finite, or every loss is 0 (``cos`` is undefined),
    the step's factors are ``r`` (the linear scalarization) and the metric ``cosmos/undefined`` is 1.
    torch's ``cosine_similarity`` (torchjd) clamps ``‖L‖`` at 1e-8, so below that torchjd's gradient
    is of a different function; this plugin follows the formula for every ``‖L‖ > 0``. Stateless.
    With incoming weights ``w`` it returns ``w * a``.

    Example::

        opt = Balancer(inner, plugins=[("cosmos", {"lambda_": 2.0, "preference": {"math": 0.7, "code": 0.3}})])
        opt.backward({"math": loss_math, "code": loss_code})
    """

    name = "cosmos"
    Options = COSMOSOptions
    options: COSMOSOptions

    def gradient(self, losses: Tensor, preference: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.options.lambda_ == 0.0:  # an option, not a tensor: the linear scalarization, defined everywhere
            return preference, preference
        scale = losses.abs().max()
        scaled = losses / torch.where(scale > 0, scale, 1.0)
        norm = torch.linalg.vector_norm(scaled)
        unit_l = scaled / norm  # nan when every loss is 0: the step is then undefined
        unit_r = preference / torch.linalg.vector_norm(preference)
        cosine = (unit_r * unit_l).sum()
        factors = preference - (self.options.lambda_ / (scale * norm)) * (unit_r - cosine * unit_l)
        return factors, preference
