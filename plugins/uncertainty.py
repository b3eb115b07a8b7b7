"""``uncertainty``: uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018), learned log-variances."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ._loss_scale import LossScaleOptions, LossScaleState, LossScaling

__all__ = ["Uncertainty", "UncertaintyOptions"]


class UncertaintyOptions(LossScaleOptions):
    """Options of :class:`Uncertainty`."""

    init: float = Field(-0.5, description="Initial log-variance s = log σ² of a new group (LibMTL: -0.5).")


class Uncertainty(LossScaling):
    """Weights each group by its learned homoscedastic uncertainty (Kendall, Gal, Cipolla 2018).

    Kendall, Gal, Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
    and Semantics*, CVPR 2018. Each group has a learned log-variance ``s_i = log σ_i²`` and the
    objective is (the paper's Gaussian-likelihood form, eq. 7, as LibMTL's ``UW`` implements it)::

        L = Σ_i ( L_i / (2 exp(s_i)) + s_i / 2 )

    so the gradient of the model is ``Σ_i a_i ∇L_i`` with ``a_i = 1 / (2 exp(s_i))``, and the
    log-variances descend ``∂L/∂s_i = 1/2 - L_i / (2 exp(s_i))``, whose fixed point is ``σ_i² = L_i``:
    a group with a large loss gets a small weight. The paper's classification form (``1/σ²`` on a
    softmax loss, eq. 10) differs by a factor 2 in the weight and is not offered.

    ``s`` is the plugin's state and takes its own step (``optimizer``, ``lr``) after weighting, from
    this step's losses (``stats.losses``, recorded by ``opt.backward({...})``); nothing is added to
    the user's optimizer. LibMTL puts ``s`` into the model's optimizer: with the same Adam settings
    (``lr``, no weight decay) the two agree step for step. Missing losses, new and absent groups:
    :mod:`._loss_scale`. With incoming weights ``w`` the plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-4), plugins=[("uncertainty", {"lr": 1e-4})])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "uncertainty"
    Options = UncertaintyOptions
    options: UncertaintyOptions

    def factors(self, scalar: Tensor) -> Tensor:
        return torch.exp(-scalar) / 2.0

    def scalar_gradient(self, scalar: Tensor, losses: Tensor) -> Tensor:
        return 0.5 - losses * torch.exp(-scalar) / 2.0

    def metrics(self, state: LossScaleState) -> dict[str, object]:
        """Each group's learned variance ``σ² = exp(s)``, by name."""
        return {f"sigma2/{name}": state["scalar"][i].exp() for i, name in enumerate(state["names"])}
