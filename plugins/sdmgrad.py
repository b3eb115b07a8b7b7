"""``sdmgrad``: SDMGrad, stochastic direction-oriented multi-objective gradient (Xiao et al., NeurIPS 2023)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions

from ._named import NamedIndex
from .modo import ESTIMATE_HELP, Estimate, SimplexState, SimplexWeighting, project_onto_simplex, sampled_matrix

__all__ = ["SDMGrad", "SDMGradOptions", "SDMGradState"]


class SDMGradOptions(PluginOptions):
    """Options of :class:`SDMGrad`."""

    lambda_: float = Field(0.3, ge=0.0, description="λ, the pull towards the mean gradient (paper's runs and "
                           "torchjd: 0.3); 0 is a stochastic MGDA.")  # fmt: skip
    lr: float = Field(10.0, gt=0.0, description="Step size of the inner projected SGD on the weights (torchjd: 10).")
    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="Momentum of the inner SGD (torchjd: 0.5).")
    iterations: int = Field(20, ge=1, le=1000, description="Inner SGD iterations per step (a fixed count; torchjd 20).")
    estimate: Estimate = Field("naive", description=ESTIMATE_HELP)


SDMGradState = SimplexState  # the inner weights w of every task seen, over ``names``


class SDMGrad(SimplexWeighting):
    """A stochastic MGDA direction kept within reach of the mean gradient (Xiao et al. 2023).

    Xiao, Ban, Ji, *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms*, NeurIPS 2023, Algorithm 1. With two independent samples ``ξ, ξ'``, the matrix
    ``M = ∇F_ξᵀ ∇F_ξ'`` (``k×k``), the preference ``w̃ = 1/k`` and the weights ``w`` of the state,
    ``iterations`` projected SGD steps with momentum ``μ`` on the scaled matrix ``A = M / s²``::

        v ← μ v + A (w + λ w̃)      (v = A (w + λ w̃) at the first iteration)
        w ← Π_Δ(w - lr · v)
        d = Σ_i a_i g_i,    a = (w + λ w̃) / (1 + λ)

    (``Π_Δ`` the projection onto the simplex). ``A (w + λ w̃)`` is the stochastic gradient of
    ``½ ‖∇F w + λ ∇F w̃‖²`` over ``w``; the direction stays in a ball around the mean gradient
    ``∇F w̃`` whose size ``λ`` sets (``λ = 0``: MGDA, ``λ → ∞``: the mean). ``s`` is the mean of
    ``sqrt(max(M_ii, 0))`` (the official code's and torchjd's scaling, paper §6.1), so ``lr`` does not
    depend on the gradients' scale. Only inner products enter: the update is exact from the Gram
    matrix. ``estimate="naive"`` takes ``M = G`` (``ξ = ξ'``, the step's own gradients);
    ``estimate="split_half"`` captures each task as two independent halves ``"x/A"``, ``"x/B"``
    (:mod:`balancer.recipes.split_half`), ``M_ij = 4 ⟨g_iA, g_jB⟩``, and gives both halves the
    task's weight (the update is on the whole batch; the paper's third sample ``ζ`` is not captured).

    Against torchjd 0.18's ``SDMGradWeighting`` (the same iteration, tested equal over many steps):
    torchjd divides by ``s² + 1e-8``, an absolute floor in the gradients' squared units that freezes
    the weights of small gradients (``s² = 1e-10`` makes its steps 100 times shorter); here
    ``A = M / s²``, and ``A = 0`` when ``s = 0``, so the weights are the same at any gradient scale.
    The preference is uniform (torchjd's ``pref_vector`` is not offered). The weights start at
    ``1/k``; state is keyed by task name, a new task starts at ``1/k``, absent tasks keep theirs.
    With incoming weights ``u`` it weighs the gradients ``u_i g_i`` and returns ``u * a``.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("sdmgrad", {"lambda_": 0.3})])
    """

    name = "sdmgrad"
    Options = SDMGradOptions
    options: SDMGradOptions

    def weigh(self, stats: GroupStats, state: SDMGradState) -> tuple[Tensor, SDMGradState]:
        opts = self.options
        sampled = sampled_matrix(stats, opts.estimate, self.name)
        device = stats.gram.device
        k = len(sampled.names)
        named = NamedIndex(state["names"], sampled.names, device)
        full = named.vector(state["weights"], 1.0 / k, device)
        w = named.take(full)
        preference = torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
        scale = sampled.matrix.diagonal().clamp_min(0.0).sqrt().mean()
        square = scale * scale
        a = torch.where(square > 0, sampled.matrix / torch.where(square > 0, square, 1.0), 0.0)
        velocity = torch.zeros_like(w)
        for _ in range(opts.iterations):
            velocity = opts.momentum * velocity + a @ (w + opts.lambda_ * preference)
            w = project_onto_simplex(w - opts.lr * velocity)
        new = SDMGradState(names=named.names, weights=named.put(full, w))
        return sampled.to_groups((w + opts.lambda_ * preference) / (1.0 + opts.lambda_)), new

    def metrics(self, state: SDMGradState) -> dict[str, object]:
        """The inner weights ``w`` of every task seen, by name."""
        return {f"w/{name}": state["weights"][i] for i, name in enumerate(state["names"])}
