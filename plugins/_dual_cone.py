"""What ``upgrad`` and ``dualproj`` share: projecting combinations of the group gradients onto
the dual cone ``{x : g_jᵀx ≥ 0 for all j}`` (Quinton & Rey, *Jacobian Descent for
Multi-Objective Optimization*, 2024), and the option that regularises it."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import PluginOptions

from ._qp import solve_nonneg_qp, trace_normalised

__all__ = ["DualConeOptions", "project_onto_dual_cone"]


class DualConeOptions(PluginOptions):
    """Options of the dual-cone projections."""

    reg_eps: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Adds reg_eps·I to the trace-normalised Gram before projecting (torchjd uses 1e-4); "
        "0 projects exactly.",
    )


def project_onto_dual_cone(gram: Tensor, u: Tensor, reg_eps: float = 0.0) -> Tensor:
    """``v = argmin_{v ≥ u} vᵀ G' v`` for each row ``u``: the projection of ``Aᵀu`` onto the dual
    cone is ``Aᵀv`` (Proposition 1 of the paper).

    ``G' = G / tr(G) + reg_eps·I``: scale-free, and regularised as torchjd's default projector
    when ``reg_eps > 0``. Solved as ``v = u + x``, ``x ≥ 0`` minimising ``½ xᵀG'x + (G'u)ᵀx``;
    ``u`` is ``[k]`` or a batch ``[m, k]`` of independent problems. Without the regularisation
    ``G'`` is ``G`` itself: the minimiser does not depend on the scale of ``G``, and the solver
    rescales the problem anyway.
    """
    if reg_eps > 0:
        gram = trace_normalised(gram)
        gram = gram + reg_eps * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return u + solve_nonneg_qp(gram, u @ gram)
