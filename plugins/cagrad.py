"""``cagrad``: conflict-averse gradient descent (Liu et al. 2021)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

from ._options import refuse_ignored
from ._qp import solve_nonneg_qp, trace_normalised

__all__ = ["CAGrad", "CAGradOptions"]

_GRID = 16  # values of μ per bracketing round (one batched QP solve each)
_ROUNDS = 3  # bracketing rounds before the exact solve on the support
_RIDGE = 1e-12  # keeps the QPs bounded when 0 is in the hull of the gradients
_ITERS = 15  # interior-point steps of the bracketing solves: they only need to find the support
_TOL = 1e-10  # feasibility tolerance of the exact solve (the Gram has unit trace)


class CAGradOptions(PluginOptions):
    """Options of :class:`CAGrad`."""

    c: float = Field(0.5, ge=0.0, description="Radius of the ball around the mean gradient, in units of its norm.")
    rescale: Literal[0, 1, 2] = Field(
        1, description="Divide the direction by 1 (0), 1 + c² (1, the authors' default) or 1 + c (2)."
    )

    @model_validator(mode="after")
    def _nothing_ignored(self) -> CAGradOptions:
        if self.c == 0.0:
            refuse_ignored(
                self,
                ["rescale"],
                "with c=0 (1, 1 + c² and 1 + c are all 1: the update is the mean gradient)",
                "Set c > 0, or remove rescale.",
            )
        return self


def _support_solution(gram: Tensor, b: Tensor, rho: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
    """``v`` with ``G_FF v_F = μ 1 - b_F`` and ``vᵀGv = ρ²`` on the support ``F`` (nan if singular)."""
    k = b.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    reduced = torch.where(support[:, None] & support[None, :], gram, eye)
    rhs = torch.stack([support.to(gram.dtype), torch.where(support, b, 0.0)], dim=1)
    sol, _ = torch.linalg.solve_ex(reduced, rhs)
    u, p = sol[:, 0], sol[:, 1]  # v = μ u - p
    quad, lin, const = u.sum(), p.sum(), (b * p).sum()
    mu = (lin + (lin * lin - quad * (const - rho * rho)).clamp_min(0.0).sqrt()) / quad
    return mu * u - p, mu


class CAGrad(GramWeighting[State]):
    """Conflict-averse gradient: the best worst-case direction near the mean gradient (Liu et al. 2021).

    Liu, Liu, Jin, Stone and Liu, *Conflict-Averse Gradient Descent for Multi-task Learning*
    (NeurIPS 2021). With ``g_0`` the mean gradient and ``ρ = c ‖g_0‖``, the update maximises the
    smallest improvement among the groups within a ball around ``g_0``::

        d = argmax_{‖d - g_0‖ ≤ ρ} min_i g_iᵀd = g_0 + ρ g_w / ‖g_w‖,
        w = argmin_{w ≥ 0, Σ w = 1} g_wᵀg_0 + ρ ‖g_w‖,      g_w = Σ_i w_i g_i

    then divided by ``1 + c²`` (``rescale=1``, the authors' default), ``1 + c`` (2) or 1 (0).
    In terms of the Gram matrix, with ``b = G 1/k`` (so ``b_i = g_iᵀg_0``), the direction is
    ``Σ_i (1/k + v_i) g_i`` where ``v = ρ w / ‖g_w‖`` satisfies the KKT conditions
    ``(G v + b)_i = μ`` where ``v_i > 0``, ``≥ μ`` elsewhere, and ``vᵀ G v = ρ²``: for fixed ``μ``
    that is the nonnegative QP ``min ½ vᵀGv + (b - μ1)ᵀv``, whose ``vᵀGv`` grows with ``μ``. The
    plugin brackets ``μ`` with batched QP solves, then solves the KKT system exactly on the
    support found (the root of a quadratic in ``μ``). ``G`` is divided by its trace first.

    When no direction in the ball improves every group (0 in the hull of the gradients and
    ``c`` large enough) the paper's formula divides by ``‖g_w‖ = 0``: torchjd returns a zero
    direction and LibMTL a division by 1e-8. Here ``μ`` tends to 0 and the direction to one
    in the ball that conflicts with no group (``min_i g_iᵀd = 0``). With incoming weights ``w``
    the gradients ``w_i g_i`` are used and ``w * a`` is returned.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("cagrad", {"c": 0.4})])
    """

    name = "cagrad"
    Options = CAGradOptions
    options: CAGradOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        c = self.options.c
        gram = trace_normalised(stats.gram)
        k = gram.shape[0]
        b = gram.mean(1)
        rho = c * b.mean().clamp_min(0.0).sqrt()
        lo, hi = b.min(), (b + rho * gram.diagonal().clamp_min(0.0).sqrt()).min()
        grid = torch.linspace(0.0, 1.0, _GRID, dtype=gram.dtype, device=gram.device)
        index = torch.arange(_GRID, device=gram.device)
        for _ in range(_ROUNDS):
            mus = lo + (hi - lo) * grid
            vs = solve_nonneg_qp(gram, b - mus[:, None], ridge=_RIDGE, iters=_ITERS)
            reached = ((vs @ gram) * vs).sum(1) >= rho * rho
            first = torch.where(reached, index, _GRID - 1).min()
            lo, hi = mus[(first - 1).clamp_min(0)], mus[first]
            v_lo, v_hi = vs[(first - 1).clamp_min(0)], vs[first]
        exact, mu = _support_solution(gram, b, rho, v_hi > 0)
        slack = gram @ exact + b - mu
        valid = torch.isfinite(exact).all() & (exact >= -_TOL).all() & (slack >= -_TOL).all()
        # Fallback: v is affine in μ between breakpoints; interpolate linearly to vᵀGv = ρ².
        step = v_hi - v_lo
        qa, qb, qc = step @ gram @ step, 2 * (v_lo @ gram @ step), v_lo @ gram @ v_lo - rho * rho
        t = ((-qb + (qb * qb - 4 * qa * qc).clamp_min(0.0).sqrt()) / (2 * qa)).nan_to_num(1.0).clamp(0.0, 1.0)
        v = torch.where(valid, exact.clamp_min(0.0), v_lo + t * step)
        v = torch.where(rho > 0, v, 0.0)
        divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[self.options.rescale]
        return (1.0 / k + v) / divisor, state
