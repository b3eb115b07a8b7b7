"""``config``: ConFIG, conflict-free update direction (Liu, Chu, Thuerey, ICLR 2025), from the Gram matrix."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

from ._pairwise import pinv_ones, unit_cosines

__all__ = ["ConFIG", "ConFIGOptions"]


class ConFIGOptions(PluginOptions):
    """Options of :class:`ConFIG`."""

    rtol: float = Field(
        1e-12,
        gt=0.0,
        lt=1e-3,
        description="Eigenvalues of the cosine matrix below rtol·k·(largest) count as zero (dependent groups).",
    )


class ConFIG(GramWeighting[State]):
    """A direction with the same cosine to every group gradient, scaled by their projections (ConFIG).

    Liu, Chu, Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks*, ICLR 2025, eq. 2 (equal weights). With unit gradients ``u_i = g_i/‖g_i‖`` stacked as
    ``U``, the direction ``b = U⁺ 1`` is the least-norm vector with ``u_iᵀ b = 1`` for all ``i``
    (equal cosines), and the update is its unit vector times the sum of the projections::

        t = b / ‖b‖,      d = (Σ_j g_jᵀ t) t

    Everything is a function of the Gram matrix: ``b = Uᵀ C⁺ 1`` with the cosine matrix ``C``, so
    with ``c = C⁺ 1`` the update is ``Σ_i a_i g_i`` with::

        a_i = s · c_i / ‖g_i‖,      s = (Σ_j Σ_i G_ji c_i / ‖g_i‖) / (cᵀ C c)

    (``cᵀ C c = ‖b‖²``). ``C⁺`` drops eigenvalues below ``rtol · k · λ_max``, as ``imtl_g`` does;
    torchjd 0.18's ``ConFIG`` takes ``pinv`` of the explicit unit vectors, which agrees on
    independent gradients (tested). A zero gradient has no direction and gets ``a_i = 0`` (torchjd:
    its unit vector is taken as 0, the same); when ``b = 0`` (all gradients zero) the weights are 0.
    With incoming weights ``w`` it aggregates the gradients ``w_i g_i`` and returns ``w * a``.

    Uses ``torch.linalg.eigh`` on a ``k×k`` matrix; on CUDA that kernel reads its own error code on
    the host, the only synchronisation in this plugin.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters()), plugins=["config"])
    """

    name = "config"
    Options = ConFIGOptions
    options: ConFIGOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        cosines, norms = unit_cosines(stats.gram)
        nonzero = norms > 0
        c = pinv_ones(cosines, nonzero, self.options.rtol)  # C⁺ 1 over the nonzero gradients
        per_gradient = torch.where(nonzero, c / torch.where(nonzero, norms, 1.0), 0.0)  # b = Σ_i (c_i/‖g_i‖) g_i
        b_squared = c @ cosines @ c
        projections = (stats.gram @ per_gradient).sum()  # Σ_j g_jᵀ b
        positive = b_squared > 0
        scale = torch.where(positive, projections / torch.where(positive, b_squared, 1.0), 0.0)
        return scale * per_gradient, state
