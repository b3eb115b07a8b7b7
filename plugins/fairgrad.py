"""``fairgrad``: FairGrad, α-fair resource allocation across tasks (Ban & Ji, ICML 2024), from the Gram matrix."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

__all__ = ["FairGrad", "FairGradOptions"]

_STEPS = torch.tensor([2.0**-i for i in range(12)], dtype=torch.float64)  # the line search's candidate step sizes


class FairGradOptions(PluginOptions):
    """Options of :class:`FairGrad`."""

    alpha: float = Field(1.0, ge=0.0, description="α of α-fairness: 0 the plain mean, 1 proportional fairness, "
                         "larger values favour the worst-off group more (the paper tries 0.5 to 5).")  # fmt: skip
    iterations: int = Field(60, ge=1, le=1000, description="Damped Newton iterations (a fixed count: no host sync).")


class FairGrad(GramWeighting[State]):
    """Weights whose update gives every group an α-fair share of the improvement (Ban & Ji 2024).

    Ban, Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024, eq. 4. The update is
    ``d = Σ_i x_i g_i`` with weights ``x > 0`` solving::

        G x = x^(-1/α)            (entrywise power; G the Gram matrix)

    i.e. each group's rate of improvement ``g_iᵀ d`` equals ``x_i^(-1/α)``; ``α = 1`` is
    proportional fairness (Nash-MTL's bargaining condition), ``α → ∞`` max-min fairness, and
    ``α = 0`` is taken as the mean (``x = 1/k``), as torchjd does. The equation is the optimality
    condition of the strictly convex problem ``min_x ½ xᵀ G x - Σ_i h(x_i)`` with ``h' = x^(-1/α)``,
    solved here by damped Newton steps in float64 on the Gram matrix's device: a fixed number of
    iterations (``iterations``), each step size the best of 12 halvings that keeps ``x > 0``
    (evaluated at once, so no host synchronisation); on the CPU, where reading ``x`` is free, the
    iterations stop early once one moves ``x`` by rounding only (4 ulps of its largest entry): the
    remaining ones would only move it within rounding. torchjd 0.18 solves the same equation with
    scipy's ``least_squares`` from ``x = 1/k`` (on the host); the two agree to its tolerance on
    well-posed problems (tested).

    Degenerate cases: a zero gradient has no rate of improvement to share and gets ``x_i = 0``.
    When ``G`` is singular the equation may have no solution (for ``α ≥ 1`` the objective can
    decrease without bound along a null direction); the iterations then return the finite point
    they reached, whose weights grow along that direction (torchjd likewise returns least squares'
    last point). With incoming weights ``w`` it weighs the gradients ``w_i g_i`` and returns ``w * x``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters()), plugins=[("fairgrad", {"alpha": 2.0})])
    """

    name = "fairgrad"
    Options = FairGradOptions
    options: FairGradOptions

    def _objective(self, gram: Tensor, x: Tensor) -> Tensor:
        """``½ xᵀ G x - Σ h(x_i)`` for a batch of points ``x`` (rows), ``h' = x^(-1/α)``."""
        alpha = self.options.alpha
        if alpha == 1.0:
            h = x.log()
        else:
            power = 1.0 - 1.0 / alpha
            h = x.pow(power) / power
        return 0.5 * ((x @ gram) * x).sum(dim=-1) - h.sum(dim=-1)

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        k = stats.num_groups
        gram = stats.gram
        if self.options.alpha == 0.0:
            return torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device), state
        zero = gram.diagonal() <= 0
        # a zero gradient's equation becomes x_i = x_i^(-1/α) (x_i = 1), and its weight is set to 0 at the end
        system = gram + torch.diag(zero.to(gram.dtype))
        scale = system.diagonal().mean()  # solve for y = x·√scale on G/scale: the same x, better conditioned
        system = system / scale
        x = torch.full((k,), 1.0, dtype=gram.dtype, device=gram.device)
        steps = _STEPS.to(gram.device)
        inv_alpha = 1.0 / self.options.alpha
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        on_host = gram.device.type == "cpu"  # reading x costs nothing there: stop once it has converged
        settled = 4.0 * torch.finfo(gram.dtype).eps  # relative to x's largest entry
        for _ in range(self.options.iterations):
            gradient = system @ x - x.pow(-inv_alpha)
            hessian = system + torch.diag(inv_alpha * x.pow(-inv_alpha - 1.0))
            ridge = 1e-12 * hessian.diagonal().max() * eye  # a singular G (dependent groups) stays solvable
            direction, _ = torch.linalg.solve_ex(hessian + ridge, gradient)  # no error check: no host sync
            direction = torch.where(torch.isfinite(direction), direction, 0.0)
            candidates = x[None, :] - steps[:, None] * direction[None, :]
            feasible = (candidates > 0).all(dim=1)
            values = self._objective(system, candidates.clamp_min(1e-300))
            values = torch.where(feasible & torch.isfinite(values), values, torch.inf)
            current = self._objective(system, x[None, :])[0]
            tolerance = 1e-13 * current.abs().clamp_min(values.min().abs())  # near the optimum f is flat to rounding
            best = (values <= values.min() + tolerance).to(torch.int8).argmax()  # the longest step among the best
            stepped = torch.where(values[best] <= current + tolerance, candidates[best], x)
            done = on_host and torch.allclose(stepped / x.abs().max(), x / x.abs().max(), rtol=0.0, atol=settled)
            x = stepped
            if done:
                break  # moved by rounding only: the iterations have converged
        # G x = x^(-1/α) on G/scale: x' with (G/s) x' = x'^(-1/α); x = x' s^(-α/(α+1)) solves it on G
        x = x * scale.pow(-self.options.alpha / (self.options.alpha + 1.0))
        return torch.where(zero, 0.0, x), state
