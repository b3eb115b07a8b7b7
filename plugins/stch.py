"""``stch``: smooth Tchebycheff scalarization (Lin et al., ICML 2024), from the recorded losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from ._preference import ReferenceOptions, Scalarization, reference_of

__all__ = ["STCH", "STCHOptions"]


class STCHOptions(ReferenceOptions):
    """Options of :class:`STCH`."""

    mu: float = Field(
        0.1, gt=0.0, description="Smoothing μ; smaller is closer to the max (paper: 0.01 to 1, small works well)."
    )


class STCH(Scalarization):
    """Minimises a smooth maximum of the preference-weighted losses above an ideal point (STCH).

    Lin, Zhang, Chen, Zhang, Zhang, *Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization*, ICML 2024 (arXiv:2402.19078). With the groups' losses ``L``, the preference
    ``λ`` (option ``preference``, by group name; 1/k each by default, as torchjd's ``STCH``), the
    ideal point ``z*`` (option ``reference``, by group name) and the smoothing ``μ``::

        y_i = λ_i (L_i − z*_i),     S(L) = μ log Σ_i exp(y_i / μ)

    a smooth upper bound of the Tchebycheff ``max_i y_i`` (within ``μ log k``), whose gradient
    ``Σ_i a_i ∇L_i`` has the factors::

        a_i = ∂S/∂L_i = λ_i softmax(y / μ)_i

    so the groups furthest above their ideal point (weighted by preference) get nearly all the
    weight as ``μ → 0``, and ``a → λ / k`` as ``μ → ∞``. The softmax subtracts ``max_i y_i`` before
    dividing by ``μ`` (the paper's Appendix B.1), so a small ``μ`` does not overflow.

    Undefined cases: if a loss is unknown (``nan``: its group ran outside ``opt.backward``; the
    Balancer warns once, ``needs_losses``) or ``y`` is not finite, the step's factors are ``λ / k``
    (the large-``μ`` limit) and the metric ``stch/undefined`` is 1. Stateless. With incoming
    weights ``w`` it returns ``w * a``.

    Example::

        opt = Balancer(inner, plugins=[("stch", {"mu": 0.1, "reference": {"math": 0.0, "code": 0.2}})])
        opt.backward({"math": loss_math, "code": loss_code})
    """

    name = "stch"
    Options = STCHOptions
    options: STCHOptions

    def gradient(self, losses: Tensor, preference: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        y = preference * (losses - reference_of(self.options, names, losses.device))
        exponents = (y - y.max()) / self.options.mu  # nan when y is not finite: the step is then undefined
        return preference * torch.softmax(exponents, dim=0), preference / len(names)
