"""``imtl_l`` and ``imtl``: impartial multi-task learning, loss part and both parts (Liu et al., ICLR 2021)."""

from __future__ import annotations

import functools

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats

from ._loss_scale import LossScaleOptions, LossScaleState, LossScaling
from .imtl_g import IMTLG

__all__ = ["IMTL", "IMTLL", "IMTLLOptions", "IMTLOptions"]


class IMTLLOptions(LossScaleOptions):
    """Options of :class:`IMTLL`."""

    init: float = Field(0.0, description="Initial log-scale s of a new group (LibMTL: 0, a scale of 1).")


class IMTLL(LossScaling):
    """Scales every group's loss to the same level with learned log-scales (IMTL-L, Liu et al. 2021).

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, *Towards Impartial Multi-task Learning*, ICLR
    2021. Each group's loss is scaled by ``exp(s_i)`` and regularised by ``-s_i``::

        L = Σ_i ( exp(s_i) L_i - s_i )

    so the gradient of the model is ``Σ_i a_i ∇L_i`` with ``a_i = exp(s_i)``, and the log-scales
    descend ``∂L/∂s_i = exp(s_i) L_i - 1``, whose fixed point ``exp(s_i) L_i = 1`` gives every
    scaled loss the value 1. LibMTL keeps ``s`` in the model's optimizer (initialised at 0); here
    it is the plugin's state with its own step (``optimizer``, ``lr``), from this step's losses
    (``opt.backward({...})``). Missing losses, new and absent groups: :mod:`._loss_scale`. With
    incoming weights ``w`` the plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-4), plugins=["imtl_l", "imtl_g"])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "imtl_l"
    Options = IMTLLOptions
    options: IMTLLOptions

    def factors(self, scalar: Tensor) -> Tensor:
        return torch.exp(scalar)

    def scalar_gradient(self, scalar: Tensor, losses: Tensor) -> Tensor:
        return torch.exp(scalar) * losses - 1.0

    def metrics(self, state: LossScaleState) -> dict[str, object]:
        """Each group's learned loss scale ``exp(s)``, by name."""
        return {f"scale/{name}": state["scalar"][i].exp() for i, name in enumerate(state["names"])}


class IMTLOptions(IMTLLOptions):
    """Options of :class:`IMTL`: IMTL-L's, and IMTL-G's eigenvalue threshold."""

    rtol: float = Field(1e-12, gt=0.0, lt=1e-3, description="IMTL-G's threshold for dependent groups (see imtl_g).")


class IMTL(IMTLL):
    """IMTL, both halves (Liu et al. 2021): IMTL-L's loss scales, then IMTL-G on the scaled gradients.

    The same as ``plugins=["imtl_l", "imtl_g"]`` (and as LibMTL 1.1.5's ``IMTL``, whose weights are
    IMTL-G's ``α`` of the scaled gradients ``exp(s_i) g_i``; the update is ``Σ_i α_i exp(s_i) g_i``),
    in one plugin with one state. IMTL-G: :class:`~balancer.plugins.IMTLG`.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-4), plugins=["imtl"])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "imtl"
    Options = IMTLOptions
    options: IMTLOptions

    @functools.cached_property
    def _gradient_half(self) -> IMTLG:
        """IMTL-G with this plugin's ``rtol``, built once (not validated again at every step)."""
        return IMTLG(rtol=self.options.rtol)

    def update(self, stats: GroupStats, weights: Tensor, state: LossScaleState) -> tuple[Tensor, LossScaleState]:
        scaled, new_state = super().update(stats, weights, state)
        balanced, _ = self._gradient_half.update(stats, scaled, {})
        return balanced, new_state
