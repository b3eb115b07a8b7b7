"""``nash_mtl``: the Nash bargaining solution between groups, G α = 1/α (Navon et al. 2022)."""

from __future__ import annotations

from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._named import ByName, check_nonnegative, check_scalars_by_name, gather_by_name, scatter_by_name
from ._qp import any_on_cpu

__all__ = ["NashMTL", "NashMTLOptions", "NashMTLState"]

_RIDGE = 1e-10  # relative ridge: keeps the problem bounded when 0 is in the hull of the gradients
_CONVERGED = 1e-13  # Newton decrement below which the CPU loop stops early


class NashMTLOptions(PluginOptions):
    """Options of :class:`NashMTL`."""

    update_weights_every: int = Field(
        1, ge=1, description="Solve for new weights every this many steps; reuse them in between."
    )
    optim_niter: int = Field(20, ge=1, description="Newton iterations per solve (warm-started from the last solution).")
    max_norm: float = Field(1.0, ge=0.0, description="Scale the weights so that ‖Σ α_i g_i‖ ≤ max_norm; 0 disables.")


class NashMTLState(TypedDict):
    """State of :class:`NashMTL`."""

    alpha: ByName  # the last solved weight of each group, by group name
    updates: int  # update() calls so far


def solve_nash(gram: Tensor, start: Tensor, iters: int) -> Tensor:
    """``α > 0`` with ``(G α)_i = 1/α_i`` (groups with a zero gradient get ``α_i = 0``).

        ``start`` is the previous solution (``nan`` where there is none).

        ``α`` minimises the self-concordant ``½ αᵀGα − Σ log α_i``; damped Newton steps
        ``α += Δ / (1 + λ)`` (``λ`` the Newton decrement) stay positive and converge quadratically
        near the solution, so a fixed count needs no line search and no host sync (on the CPU, where
    reading a value is free, the loop stops once the decrement is at rounding level). The problem is
        solved for ``β = D α`` with ``D = diag(√G_ii)``: the solution is equivariant under scaling a
        group (``α_i ∝ 1/‖g_i‖``), so the correlation matrix ``D⁻¹ G D⁻¹`` is all it needs.
    """
    diag = gram.diagonal()
    live = diag > 0
    scale = torch.where(live, diag, 1.0).sqrt()
    both = live[:, None] & live[None, :]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    corr = torch.where(both, gram / (scale[:, None] * scale[None, :]), eye) + _RIDGE * eye
    beta = torch.where(live & (start > 0), start * scale, 1.0)  # nan > 0 is False
    beta = beta * (gram.shape[0] / (beta @ corr @ beta)).sqrt()  # best multiple of the start
    on_cpu = gram.device.type == "cpu"
    for _ in range(iters):
        grad = corr @ beta - 1.0 / beta
        chol, _ = torch.linalg.cholesky_ex(corr + torch.diag(1.0 / (beta * beta)))
        step = -torch.cholesky_solve(grad[:, None], chol)[:, 0]
        decrement = (-(grad * step).sum()).clamp_min(0.0).sqrt()
        new = beta + step / (1.0 + decrement)
        beta = torch.where(torch.isfinite(new).all() & (new > 0).all(), new, beta)
        if on_cpu and not any_on_cpu(decrement > _CONVERGED):
            break  # quadratic convergence reached rounding level; the rest would not move β
    return torch.where(live, beta / scale, 0.0)


class NashMTL(GramWeighting[NashMTLState]):
    """Nash bargaining between groups: weights α with G α = 1/α (Navon et al. 2022).

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, *Multi-Task Learning as a
    Bargaining Game* (ICML 2022). The update ``d = Σ α_i g_i`` maximises ``Σ_i log(g_iᵀd)`` in a
    ball; its weights solve (Theorem 5.1)::

        (G α)_i = 1 / α_i,   α > 0          i.e.  α = argmin ½ αᵀGα − Σ log α_i

    The solve runs on ``G / ‖G‖_F`` (as in the authors' code and torchjd) and is mapped back
    exactly, ``α = α_n / √‖G‖_F``: the update ``Σ α_i g_i`` has norm ``√k`` whatever the
    gradients' scale, before ``max_norm`` clips it (the authors' ``clip_grad_norm_``).
    The weights are recomputed every ``update_weights_every`` steps with ``optim_niter`` damped
    Newton iterations (their sequential convex programme is replaced by Newton's method on the
    same objective; the solution is the same), warm-started from the last ``α``. A group with a
    zero gradient has no solution (``(Gα)_i = 0``) and gets ``α_i = 0``; opposite gradients make
    the problem unbounded and a ridge of 1e-10 (relative) bounds it.

    State: the last ``α`` per group name and the number of updates. With incoming weights ``w``
    the gradients ``w_i g_i`` bargain and ``w * α`` is returned.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters()), plugins=[("nash_mtl", {"max_norm": 0})])
    """

    name = "nash_mtl"
    Options = NashMTLOptions
    options: NashMTLOptions

    def init(self) -> NashMTLState:
        return NashMTLState(alpha={}, updates=0)

    def check_state(self, state: NashMTLState) -> None:
        """The last weights: a 0-d tensor per group name, finite and not negative; a count not negative."""
        super().check_state(state)
        check_scalars_by_name(state["alpha"], "alpha")
        check_nonnegative(state["updates"], "updates")

    def weigh(self, stats: GroupStats, state: NashMTLState) -> tuple[Tensor, NashMTLState]:
        opts = self.options
        gram = stats.gram
        stored = dict(state["alpha"])
        known = all(n in stored for n in stats.names)
        previous = gather_by_name(stored, stats.names, torch.full_like(gram.diagonal(), torch.nan))
        if known and state["updates"] % opts.update_weights_every != 0:
            alpha = previous
        else:
            frobenius = gram.norm()
            size = torch.where(frobenius > 0, frobenius, 1.0)
            alpha = solve_nash(gram / size, previous * size.sqrt(), opts.optim_niter) / size.sqrt()
            stored = scatter_by_name(stored, stats.names, alpha)
        if opts.max_norm > 0:
            norm = (alpha @ gram @ alpha).clamp_min(0.0).sqrt()
            alpha = alpha * torch.where(norm > opts.max_norm, opts.max_norm / norm, 1.0)
        return alpha, NashMTLState(alpha=stored, updates=state["updates"] + 1)
