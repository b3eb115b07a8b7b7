"""Small dense quadratic programs, solved in torch on the Gram matrix's device without host syncs.

The aggregators reduce to one problem over ``k`` group coefficients (``k`` up to a few dozen)::

    minimise  ½ xᵀ (G + δ D²) x + qᵀ x   subject to  x ≥ 0,        D = diag(√G_ii)

with ``G`` positive semi-definite and ``δ`` a relative ridge (0 unless a caller needs the problem
bounded). Lower bounds ``x ≥ l`` are the same problem after the shift ``x = l + x'`` (UPGrad,
DualProj); the simplex problem of MGDA is one of them after a change of variables
(:func:`min_norm_point`). :func:`solve_nonneg_qp` solves a batch of linear terms ``q`` with one
``G`` at once (UPGrad solves ``k``, CAGrad a grid) in float64, in two stages and a fixed amount
of work, so that no decision ever needs a value on the host:

0. for ``k ≤ ENUMERATE_UP_TO`` (8): the KKT equalities solved on all ``2^k`` supports in one
   batched solve (each ``G_SS`` factorised once, the problems as right-hand sides), keeping
   the candidate with the least KKT residual: exact, and one call instead of thirty
   iterations. Problems where that residual is not at rounding level (degenerate ones) go
   through stages 1 and 2;
1. a primal-dual interior-point method (Mehrotra's predictor-corrector: ``iters`` Newton steps
   on ``G + Z X⁻¹``, one Cholesky factorisation each); a problem whose residuals fall below
   ``1e-14`` stops moving (``torch.where``), so surplus iterations are harmless; on the CPU,
   where reading a value is free, the loop ends as soon as every problem has stopped;
2. polishing: the support ``{i : x_i > z_i}`` read off the interior point fixes the active set,
   and one linear solve of the equality-constrained problem on it gives the exact solution; two
   more rounds correct the support (drop variables that came out negative, add those with a
   negative gradient). A solve replaces the point only where it is finite and its KKT residual
   is not larger.

The problem is solved after a Jacobi scaling ``x = D⁻¹u`` (nonnegativity is invariant under it)
and with the scaled ``D⁻¹q`` divided by its largest entry (the solution is linear in ``q``): the
scaled problem has a unit diagonal and ``max|q| = 1`` whatever the scale of ``G`` and ``q``, so
groups whose gradient norms differ by 1e±12 are as easy as equal ones, and the tolerances are
absolute. A row with a zero diagonal (a zero gradient) gets a unit diagonal: its variable does
not change the objective, and this picks the smallest minimiser ``x_i = max(0, -q_i)``.

Accuracy: on well-conditioned problems the relative natural KKT residual ``‖min(x, ∇)‖∞`` of
the result is at the level of float64 rounding (tests hold it to 1e-10, after 30 iterations).
On singular or ill-conditioned ``G`` (rank-deficient Gram matrices, duplicated or opposite
gradients) the polishing solve may be singular and is then rejected, and the interior point is
returned: its residual is about 1e-9, the minimiser ``x`` need not be unique, but the combined
direction ``Aᵀx`` is.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ENUMERATE_UP_TO",
    "ITERATIONS",
    "any_on_cpu",
    "kkt_residual",
    "min_norm_point",
    "solve_nonneg_qp",
    "trace_normalised",
]

ENUMERATE_UP_TO = 8
"""Up to this many variables every support is tried in one batched solve (exact, fixed cost);
above it, or where that candidate is not exact (degenerate problems), the interior point runs."""

ITERATIONS = 30
"""Interior-point steps per solve: Mehrotra's method needs 10-25 on these problem sizes."""

_JITTER = 1e-13  # added to the Newton matrix only (not to the problem): keeps Cholesky defined
_STOP = 1e-14  # residual below which a problem stops moving
_TO_BOUNDARY = 0.995  # fraction of the step to the boundary of the positive orthant
_POLISH_ROUNDS = 3  # exact solves on the interior point's support, then on active-set corrections of it
_SOLVED = 1e-13  # relative KKT residual below which an enumerated candidate is taken as the optimum
_TINY = torch.finfo(torch.float64).tiny  # the smallest normal float64
_CPU_BATCHED_LU_MAX = 128
"""Above this size a batched LU on the CPU with more than one thread hangs or fails inside MKL
(pytorch/pytorch#142815, "Parameter 6 was incorrect on entry to DLASWP", from k ≈ 151 on):
such systems are solved one matrix at a time (UPGrad and CAGrad at k = 256 hung for good)."""


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


def _steplength(x: Tensor, z: Tensor, dx: Tensor, dz: Tensor) -> Tensor:
    """The largest ``t ≤ ∞`` keeping ``x + t dx`` and ``z + t dz`` nonnegative."""
    v, dv = torch.cat([x, z], -1), torch.cat([dx, dz], -1)
    ratio = torch.where(dv < 0, -v / dv.clamp_max(-1e-300), torch.inf)
    return ratio.amin(-1, keepdim=True)


def _interior_point(gram: Tensor, linear: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    x = torch.ones_like(linear)
    z = torch.ones_like(linear)
    jitter = _JITTER * torch.eye(linear.shape[-1], dtype=gram.dtype, device=gram.device)
    on_cpu = gram.device.type == "cpu"
    for _ in range(iters):
        r_dual = _matvec(gram, x) + linear - z
        mu = (x * z).mean(-1, keepdim=True)
        chol, _ = torch.linalg.cholesky_ex(gram + torch.diag_embed(z / x) + jitter)

        def direction(r_comp: Tensor) -> tuple[Tensor, Tensor]:
            dx = torch.cholesky_solve((r_comp / x - r_dual).unsqueeze(-1), chol).squeeze(-1)  # noqa: B023
            return dx, (r_comp - z * dx) / x  # noqa: B023

        dx, dz = direction(-x * z)  # affine-scaling predictor
        step = _steplength(x, z, dx, dz).clamp_max(1.0)
        mu_affine = ((x + step * dx) * (z + step * dz)).mean(-1, keepdim=True)
        sigma = (mu_affine / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        dx, dz = direction(sigma * mu - x * z - dx * dz)  # centring corrector
        step = (_TO_BOUNDARY * _steplength(x, z, dx, dz)).clamp_max(1.0)
        new_x, new_z = x + step * dx, z + step * dz
        moving = torch.maximum(r_dual.abs().amax(-1, keepdim=True), mu) >= _STOP
        ok = moving & (new_x > 0).all(-1, keepdim=True) & (new_z > 0).all(-1, keepdim=True)
        ok = ok & torch.isfinite(new_x).all(-1, keepdim=True) & torch.isfinite(new_z).all(-1, keepdim=True)
        x, z = torch.where(ok, new_x, x), torch.where(ok, new_z, z)
        if on_cpu and not any_on_cpu(moving):
            break  # nothing moves any more: the remaining iterations would change nothing
    return x, z


def any_on_cpu(mask: Tensor) -> bool:
    """``mask.any()`` for a CPU tensor, where reading a value costs nothing (on an accelerator it
    would be a host sync, and callers run their fixed amount of work instead). Read through
    numpy, not ``Tensor.__bool__``, so that ``check_plugin``'s sync trap still sees every read
    that would be a sync on an accelerator."""
    return bool(mask.numpy().any())


class _Supports(NamedTuple):
    """The constant tensors of the enumeration over ``k`` variables, made once per ``k`` and device."""

    support: Tensor  # [S, k, 1] bool, S = 2^k: every subset of the k variables (the empty one: x = 0)
    block: Tensor  # [S, k, k] bool: the entries of the block G_SS
    eye: Tensor  # [k, k] float64


@functools.lru_cache(maxsize=64)
def _supports(k: int, device: torch.device) -> _Supports:
    codes = torch.arange(2**k, device=device)
    support = ((codes.unsqueeze(-1) >> torch.arange(k, device=device)) & 1 == 1).unsqueeze(-1)
    eye = torch.eye(k, dtype=torch.float64, device=device)
    return _Supports(support, support & support.mT, eye)


def _enumerate(gram: Tensor, linear: Tensor) -> tuple[Tensor, Tensor]:
    """The exact minimiser for small ``k``: the KKT equalities ``G_SS x_S = -q_S`` solved on every
    support ``S`` at once, keeping the candidate that best satisfies the KKT conditions. A bounded
    problem has a minimiser whose support has a nonsingular ``G_SS``: that candidate is exact,
    and the KKT conditions are sufficient for a convex problem. Returns the candidate and where
    its relative KKT residual is above rounding level (on degenerate problems, where no candidate
    is exact: the caller falls back to the interior point there).

    ``gram`` and ``linear`` are scaled (:func:`_scaled`): ``Ĝ`` has a unit diagonal and
    ``max|q̂| = 1``. The problems are the columns of the right-hand side, so each ``Ĝ_SS`` is
    factorised once for the whole batch.
    """
    k = linear.shape[-1]
    sets = _supports(k, gram.device)
    q = linear.reshape(-1, k).mT  # [k, m]: problem j in column j
    # off S the system is the identity with a zero right-hand side: x is exactly 0 there (or not
    # finite, with the rest of a singular solve)
    x, _ = torch.linalg.solve_ex(torch.where(sets.block, gram, sets.eye), torch.where(sets.support, -q, 0.0))
    grad = torch.baddbmm(q, gram.expand(len(x), k, k), x)  # [S, k, m]: ∇ = Ĝx + q̂ of every candidate
    # natural residual ‖min(x, ∇)‖∞: 0 exactly at the optimum (x ≥ 0, ∇ ≥ 0, x ∘ ∇ = 0). Absolute, so
    # that the solution of a nearly singular Ĝ_SS, with huge entries and rounding errors to match,
    # does not beat the exact one; NaN (a singular solve, which min would take) counts as infinite
    residual = torch.minimum(x, grad).abs().amax(-2).nan_to_num(torch.inf)  # [S, m]
    residual, best = residual.min(0, keepdim=True)  # [1, m]: the first least, as argmin
    x = x.gather(0, best.unsqueeze(1).expand(1, k, -1)).squeeze(0).mT  # [m, k]
    # relative, as kkt_residual: ‖min(x, ∇)‖∞ / (max(‖x‖∞, 1) + ‖q̂‖∞)
    unsolved = residual.squeeze(0) > _SOLVED * (torch.linalg.vector_norm(x, torch.inf, dim=-1).clamp_min(1.0) + 1.0)
    return x.clamp_min(0.0).reshape(linear.shape), unsolved.reshape(linear.shape[:-1])


def batched_solve(a: Tensor, b: Tensor) -> Tensor:
    """``torch.linalg.solve_ex(a, b)[0]`` for ``[..., n, n]`` and ``[..., n]`` (NaN/inf where ``a`` is
    singular), safe on the CPU for large ``n`` (see :data:`_CPU_BATCHED_LU_MAX`)."""
    n = a.shape[-1]
    if a.device.type != "cpu" or a.dim() < 3 or n <= _CPU_BATCHED_LU_MAX or torch.get_num_threads() == 1:
        return torch.linalg.solve_ex(a, b)[0]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-1])
    flat_a, flat_b = a.expand(*batch, n, n).reshape(-1, n, n), b.expand(*batch, n).reshape(-1, n)
    return torch.stack([torch.linalg.solve_ex(m, v)[0] for m, v in zip(flat_a, flat_b, strict=True)]).reshape(*batch, n)


def _polish(gram: Tensor, linear: Tensor, support: Tensor) -> Tensor:
    eye = torch.eye(linear.shape[-1], dtype=gram.dtype, device=gram.device)
    reduced = torch.where(support.unsqueeze(-1) & support.unsqueeze(-2), gram, eye)
    return batched_solve(reduced, torch.where(support, -linear, 0.0))


def solve_nonneg_qp(gram: Tensor, linear: Tensor, *, ridge: float = 0.0, iters: int = ITERATIONS) -> Tensor:
    """Minimises ``½ xᵀ (G + δ D²) x + qᵀ x`` over ``x ≥ 0``, ``D = diag(√G_ii)``, ``δ = ridge``.

    Args:
        gram: ``[k, k]`` symmetric positive semi-definite ``G``, shared by the whole batch.
        linear: ``[..., k]`` linear term ``q``: a batch of problems.
        ridge: relative ridge ``δ ≥ 0``; with ``δ = 0`` the problem must be bounded below (true
            when ``q = G u`` for some ``u``, the projections of UPGrad and DualProj).
        iters: interior-point iterations (a fixed count: no host sync decides when to stop).

    Returns:
        ``[..., k]`` float64 minimiser, ``≥ 0``.
    """
    if gram.dim() != 2:
        raise ValueError(f"solve_nonneg_qp takes one [k, k] Gram matrix, not a batch of shape {tuple(gram.shape)}")
    gram, linear, unscale = _scaled(_float64(gram), _float64(linear), ridge)
    if linear.shape[-1] > ENUMERATE_UP_TO:
        return _interior_solution(gram, linear, iters) * unscale
    x, unsolved = _enumerate(gram, linear)
    if gram.device.type == "cpu" and not any_on_cpu(unsolved):
        return x * unscale
    return torch.where(unsolved.unsqueeze(-1), _interior_solution(gram, linear, iters), x) * unscale


def _scaled(gram: Tensor, linear: Tensor, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(Ĝ, q̂, f)``: the problem in the variables ``û = D x / c``, ``D = diag(√G_ii)``, with the
    ridge on the (unit) diagonal of ``Ĝ = D⁻¹GD⁻¹`` and ``q̂ = D⁻¹q / c``, ``c = max|D⁻¹q|``: every
    number of order one whatever the scale of ``G`` and ``q``. Its solution ``û`` gives ``x = f û``."""
    diag = gram.diagonal()
    scale = torch.where(diag > 0, diag, 1.0).sqrt()
    gram = gram / torch.outer(scale, scale)
    gram.diagonal().fill_(1.0 + ridge)  # G_ii / (√G_ii)² = 1, and a zero row gets 1 too
    linear = linear / scale
    # any positive c gives the same solution; q = 0 (solution 0) takes the smallest normal number
    size = torch.linalg.vector_norm(linear, torch.inf, dim=-1, keepdim=True).clamp_min(_TINY)
    return gram, linear / size, size / scale


def _float64(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def _interior_solution(gram: Tensor, linear: Tensor, iters: int) -> Tensor:
    x, z = _interior_point(gram, linear, iters)
    best, best_residual = x, _natural_residual(gram, linear, x)
    support = x > z
    for _ in range(_POLISH_ROUNDS):
        polished = _polish(gram, linear, support)
        residual = _natural_residual(gram, linear, polished)
        better = torch.isfinite(polished).all(-1) & (residual <= best_residual)
        best = torch.where(better.unsqueeze(-1), polished, best)
        best_residual = torch.where(better, residual, best_residual)
        # active-set correction: drop variables that came out negative, add those whose
        # gradient is negative (the interior point may misjudge a variable near the boundary)
        grad = _matvec(gram, polished) + linear
        support = torch.where(support, polished > 0, grad < 0)
    return best.clamp_min(0.0)


def min_norm_point(gram: Tensor, *, ridge: float = 1e-12, iters: int = ITERATIONS) -> Tensor:
    """Weights ``w`` on the simplex minimising ``wᵀ G w``: the min-norm point of the hull of the ``g_i``.

    Solved as ``v = argmin_{v ≥ 0} ½ vᵀ G v - 1ᵀ v`` and ``w = v / Σ v`` (the KKT conditions of
    the two problems match: ``(G v)_i = 1`` on the support and ``≥ 1`` off it). When the hull
    contains 0 that problem is unbounded, and the ridge ``δ`` bounds it: ``w`` is then the
    combination with ``Σ w_i g_i ≈ 0`` (Pareto stationarity), accurate to about ``δ``. A zero
    gradient is such a point by itself: the groups with a zero gradient share the weight.
    """
    k = gram.shape[-1]
    minus_ones = torch.full((k,), -1.0, dtype=torch.float64, device=gram.device)
    v = solve_nonneg_qp(gram, minus_ones, ridge=ridge, iters=iters)
    zero = (gram.diagonal() <= 0).to(torch.float64)
    v = torch.where(zero.any(), zero, v)  # w ∝ v, or shared by the zero gradients
    w = v / v.sum().clamp_min(1e-300)
    return torch.where(torch.isfinite(w).all(), w, 1.0 / k)
