"""Small dense quadratic programs, solved in torch on the Gram matrix's device without host syncs.

The aggregators reduce to one problem over ``k`` group coefficients (``k`` up to a few dozen)::

    minimise  ½ xᵀ (G + δ D²) x + qᵀ x   subject to  x ≥ 0,        D = diag(√G_ii)

with ``G`` positive semi-definite and ``δ`` a relative ridge (0 unless a caller needs the problem
bounded). Lower bounds ``x ≥ l`` are the same problem after the shift ``x = l + x'`` (UPGrad,
DualProj); the simplex problem of MGDA is one of them after a change of variables
(:func:`min_norm_point`). :func:`solve_nonneg_qp` solves a batch at once (UPGrad solves ``k``,
CAGrad a grid) in float64, in two stages and a fixed amount of work, so that no decision ever
needs a value on the host:

1. a primal-dual interior-point method (Mehrotra's predictor-corrector: ``iters`` Newton steps
   on ``G + Z X⁻¹``, one Cholesky factorisation each); a problem whose residuals fall below
   ``1e-14`` stops moving (``torch.where``), so surplus iterations are harmless; on the CPU,
   where reading a value is free, the loop ends as soon as every problem has stopped or its
   polished point (stage 2) is already exact;
2. polishing: the support ``{i : x_i > z_i}`` read off the interior point fixes the active set,
   and one linear solve of the equality-constrained problem on it gives the exact solution. It
   replaces the interior point only where it is finite and its KKT residual is not larger.

The problem is solved after a Jacobi scaling ``x = D⁻¹u`` (nonnegativity is invariant under it)
and with ``q`` divided by ``max|q|`` (the solution is linear in ``q``), so groups whose gradient
norms differ by 1e±12 are as easy as equal ones. A row with a zero diagonal (a zero gradient)
gets a unit diagonal: its variable does not change the objective, and this picks the smallest
minimiser ``x_i = max(0, -q_i)``.

Accuracy: on well-conditioned problems the relative natural KKT residual ``‖min(x, ∇)‖∞`` of
the result is at the level of float64 rounding (tests hold it to 1e-10, after 30 iterations).
On singular or ill-conditioned ``G`` (rank-deficient Gram matrices, duplicated or opposite
gradients) the polishing solve may be singular and is then rejected, and the interior point is
returned: its residual is about 1e-9, the minimiser ``x`` need not be unique, but the combined
direction ``Aᵀx`` is.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ITERATIONS", "kkt_residual", "min_norm_point", "solve_nonneg_qp", "trace_normalised"]

ITERATIONS = 30
"""Interior-point steps per solve: Mehrotra's method needs 10-25 on these problem sizes."""

_JITTER = 1e-13  # added to the Newton matrix only (not to the problem): keeps Cholesky defined
_STOP = 1e-14  # residual below which a problem stops moving
_TO_BOUNDARY = 0.995  # fraction of the step to the boundary of the positive orthant
_SOLVED = 1e-13  # relative KKT residual at which a polished point counts as the exact optimum (CPU early exit)


def trace_normalised(gram: Tensor) -> Tensor:
    """``G / tr(G)`` (``G`` itself when the trace is 0): the Gram of ``A / ‖A‖_F``, scale-free."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return gram / torch.where(trace > 0, trace, 1.0)


def _matvec(gram: Tensor, x: Tensor) -> Tensor:
    return (gram @ x.unsqueeze(-1)).squeeze(-1)


def _natural_residual(gram: Tensor, linear: Tensor, x: Tensor) -> Tensor:
    return torch.minimum(x, _matvec(gram, x) + linear).abs().amax(-1)


def kkt_residual(gram: Tensor, linear: Tensor, x: Tensor) -> Tensor:
    """Relative natural KKT residual ``‖min(x, Gx + q)‖∞ / scale`` (0 exactly at the optimum)."""
    scale = gram.abs().amax((-2, -1)) * x.abs().amax(-1).clamp_min(1.0) + linear.abs().amax(-1) + 1e-300
    return _natural_residual(gram, linear, x) / scale


def _steplength(v: Tensor, dv: Tensor) -> Tensor:
    ratio = torch.where(dv < 0, -v / dv.clamp_max(-1e-300), torch.inf)
    return ratio.amin(-1, keepdim=True)


def _interior_point(gram: Tensor, linear: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    x = torch.ones_like(linear)
    z = torch.ones_like(linear)
    eye = torch.eye(linear.shape[-1], dtype=gram.dtype, device=gram.device)
    on_cpu = gram.device.type == "cpu"
    for _ in range(iters):
        r_dual = _matvec(gram, x) + linear - z
        mu = (x * z).mean(-1, keepdim=True)
        chol, _ = torch.linalg.cholesky_ex(gram + torch.diag_embed(z / x) + _JITTER * eye)

        def direction(r_comp: Tensor) -> tuple[Tensor, Tensor]:
            dx = torch.cholesky_solve((r_comp / x - r_dual).unsqueeze(-1), chol).squeeze(-1)  # noqa: B023
            return dx, (r_comp - z * dx) / x  # noqa: B023

        dx, dz = direction(-x * z)  # affine-scaling predictor
        step = torch.minimum(_steplength(x, dx), _steplength(z, dz)).clamp_max(1.0)
        mu_affine = ((x + step * dx) * (z + step * dz)).mean(-1, keepdim=True)
        sigma = (mu_affine / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        dx, dz = direction(sigma * mu - x * z - dx * dz)  # centring corrector
        step = (_TO_BOUNDARY * torch.minimum(_steplength(x, dx), _steplength(z, dz))).clamp_max(1.0)
        new_x, new_z = x + step * dx, z + step * dz
        moving = torch.maximum(r_dual.abs().amax(-1, keepdim=True), mu) >= _STOP
        ok = moving & (new_x > 0).all(-1, keepdim=True) & (new_z > 0).all(-1, keepdim=True)
        ok = ok & torch.isfinite(new_x).all(-1, keepdim=True) & torch.isfinite(new_z).all(-1, keepdim=True)
        x, z = torch.where(ok, new_x, x), torch.where(ok, new_z, z)
        if on_cpu and _solved_on_cpu(gram, linear, x, z, moving):
            break
    return x, z


def _solved_on_cpu(gram: Tensor, linear: Tensor, x: Tensor, z: Tensor, moving: Tensor) -> bool:
    """Whether every problem is done: none moves, or polishing on the current support already
    gives the exact optimum. Used on the CPU only, where reading a value costs nothing (on an
    accelerator it would be a host sync, and the loop runs its fixed count). Read through numpy,
    not ``Tensor.__bool__``, so that ``check_plugin``'s sync trap still sees every read that would
    be a sync on an accelerator."""
    if not moving.numpy().any():
        return True
    polished = _polish(gram, linear, x > z)
    return bool((kkt_residual(gram, linear, polished) <= _SOLVED).numpy().all())


def _polish(gram: Tensor, linear: Tensor, support: Tensor) -> Tensor:
    eye = torch.eye(linear.shape[-1], dtype=gram.dtype, device=gram.device)
    reduced = torch.where(support.unsqueeze(-1) & support.unsqueeze(-2), gram, eye)
    x, _ = torch.linalg.solve_ex(reduced, torch.where(support, -linear, 0.0))
    return x


def solve_nonneg_qp(gram: Tensor, linear: Tensor, *, ridge: float = 0.0, iters: int = ITERATIONS) -> Tensor:
    """Minimises ``½ xᵀ (G + δ D²) x + qᵀ x`` over ``x ≥ 0``, ``D = diag(√G_ii)``, ``δ = ridge``.

    Args:
        gram: ``[..., k, k]`` symmetric positive semi-definite ``G`` (broadcast against ``linear``).
        linear: ``[..., k]`` linear term ``q``.
        ridge: relative ridge ``δ ≥ 0``; with ``δ = 0`` the problem must be bounded below (true
            when ``q = G u`` for some ``u``, the projections of UPGrad and DualProj).
        iters: interior-point iterations (a fixed count: no host sync decides when to stop).

    Returns:
        ``[..., k]`` float64 minimiser, ``≥ 0``.
    """
    batch = torch.broadcast_shapes(gram.shape[:-2], linear.shape[:-1])
    k = linear.shape[-1]
    gram = gram.to(torch.float64).expand(*batch, k, k)
    linear = linear.to(torch.float64).expand(*batch, k)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    scale = torch.where(diag > 0, diag, 1.0).sqrt()
    gram = gram / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    gram = gram + torch.diag_embed((diag <= 0).to(gram.dtype) + ridge)
    size = linear.abs().amax(-1, keepdim=True)
    size = torch.where(size > 0, size, 1.0)
    linear = linear / (scale * size)
    x, z = _interior_point(gram, linear, iters)
    polished = _polish(gram, linear, x > z)
    better = _natural_residual(gram, linear, polished) <= _natural_residual(gram, linear, x)
    x = torch.where((torch.isfinite(polished).all(-1) & better).unsqueeze(-1), polished, x).clamp_min(0.0)
    return x * size / scale


def min_norm_point(gram: Tensor, *, ridge: float = 1e-12, iters: int = ITERATIONS) -> Tensor:
    """Weights ``w`` on the simplex minimising ``wᵀ G w``: the min-norm point of the hull of the ``g_i``.

    Solved as ``v = argmin_{v ≥ 0} ½ vᵀ G v - 1ᵀ v`` and ``w = v / Σ v`` (the KKT conditions of
    the two problems match: ``(G v)_i = 1`` on the support and ``≥ 1`` off it). When the hull
    contains 0 that problem is unbounded, and the ridge ``δ`` bounds it: ``w`` is then the
    combination with ``Σ w_i g_i ≈ 0`` (Pareto stationarity), accurate to about ``δ``. A zero
    gradient is such a point by itself: the groups with a zero gradient share the weight.
    """
    k = gram.shape[-1]
    ones = torch.ones(gram.shape[:-1], dtype=torch.float64, device=gram.device)
    v = solve_nonneg_qp(gram, -ones, ridge=ridge, iters=iters)
    w = v / v.sum(-1, keepdim=True).clamp_min(1e-300)
    zero = gram.diagonal(dim1=-2, dim2=-1) <= 0
    count = zero.sum(-1, keepdim=True)
    w = torch.where(count > 0, zero.to(w.dtype) / count.clamp_min(1), w)
    return torch.where(torch.isfinite(w).all(-1, keepdim=True), w, torch.full_like(w, 1.0 / k))
