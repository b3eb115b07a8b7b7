"""``imtl_g``: impartial multi-task learning, gradient part (Liu et al., ICLR 2021), closed form."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

from ._pairwise import pinv_ones, unit_cosines

__all__ = ["IMTLG", "IMTLGOptions"]


class IMTLGOptions(PluginOptions):
    """Options of :class:`IMTLG`."""

    rtol: float = Field(
        1e-12,
        gt=0.0,
        lt=1e-3,
        description="Eigenvalues of the cosine matrix below rtol·k·(largest) count as zero (dependent groups).",
    )


class IMTLG(GramWeighting[State]):
    """Weights giving every group gradient the same projection on the update (Liu et al. 2021).

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, *Towards Impartial Multi-task Learning*, ICLR
    2021 (IMTL-G). The update ``d = Σ_i a_i g_i`` with ``Σ_i a_i = 1`` has equal projections on all
    unit gradients, ``d · g_i/‖g_i‖ = d · g_j/‖g_j‖``. In terms of the Gram matrix ``G`` and the
    norms ``n = √diag(G)`` that is ``G a ∝ n``, so::

        a = G⁺ n / (1ᵀ G⁺ n)

    the paper's closed form when the gradients are independent, and with the pseudo-inverse the
    generalisation of Quinton & Rey (*Jacobian Descent for Multi-Objective Optimization*, 2024)
    when some are dependent. The plugin solves it on the cosine matrix ``C = D⁻¹GD⁻¹``
    (``D = diag(n)``): ``a ∝ D⁻¹ C⁺ 1``, so norms 1e-30 or 1e30 apart cannot push a group below
    the rank threshold (which a pseudo-inverse of ``G`` itself would do: torchjd's ``pinv(G)``
    drops a group whose norm is 1e8 times smaller than another's). The two agree when the
    equations are consistent, which is always the case for independent gradients.

    Degenerate cases: a zero gradient gets ``a_i = 0``; when no direction has equal positive
    projections and ``1ᵀ C⁺ 1 = 0`` (e.g. two opposite gradients, or all gradients zero) the
    weights are all zero: IMTL-G's impartial update is then the zero vector. With incoming
    weights ``w`` it balances the gradients ``w_i g_i`` and returns ``w * a``.

    Uses ``torch.linalg.eigh`` on a ``k×k`` matrix; on CUDA that kernel reads its own error code
    on the host, the only synchronisation in this plugin.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["imtl_g"])
    """

    name = "imtl_g"
    Options = IMTLGOptions
    options: IMTLGOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        cosines, norms = unit_cosines(stats.gram)
        nonzero = norms > 0
        solution = pinv_ones(cosines, nonzero, self.options.rtol)  # C⁺ 1
        raw = torch.where(nonzero, solution / torch.where(nonzero, norms, 1.0), 0.0)
        total = raw.sum()
        scale = raw.abs().sum()
        balanced = total.abs() > 1e-12 * scale
        factors = torch.where(balanced, raw / torch.where(balanced, total, 1.0), 0.0)
        return factors, state
