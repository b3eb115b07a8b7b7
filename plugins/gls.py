"""``gls``: the geometric loss strategy (Chennupati et al., CVPR Workshops 2019), from the recorded losses."""

from __future__ import annotations

import torch
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

__all__ = ["GLS", "GLSOptions"]


class GLSOptions(PluginOptions):
    """Options of :class:`GLS` (none)."""


class GLS(GramWeighting[dict[str, Tensor]]):
    """Minimises the geometric mean of the groups' losses (Chennupati et al. 2019).

    Chennupati, Sistu, Yogamani, Rawashdeh, *MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning*, CVPR Workshops 2019. The objective is
    ``L = (Π_i L_i)^(1/K)`` over the ``K`` groups of the step, whose gradient is::

        ∇L = Σ_i a_i ∇L_i,      a_i = L / (K L_i)

    so a group's weight is inversely proportional to its loss, scaled by the geometric mean. The
    factors are computed in log space, ``a_i = exp(mean_j log L_j - log L_i) / K``, which stays
    finite for losses whose product under- or overflows. LibMTL's ``GLS`` back-propagates this
    gradient but reports ``L_i / (K Π_j L_j)`` as its weights, which is not it (tested).

    Undefined cases: the geometric mean needs every loss of the step to be known and positive. If
    any is ``nan`` (it ran outside ``opt.backward``; the Balancer warns once, ``needs_losses``),
    zero, negative or infinite, the step's factors are ``1/K`` (the arithmetic mean of the losses)
    and the metric ``gls/undefined`` is 1 for that step. Stateless. With incoming weights ``w`` the
    plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters()), plugins=["gls"])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "gls"
    Options = GLSOptions
    options: GLSOptions
    needs_losses = True

    def init(self) -> dict[str, Tensor]:
        return {"undefined": torch.zeros((), dtype=torch.float64)}

    def weigh(self, stats: GroupStats, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        losses = stats.losses.to(torch.float64)
        usable = torch.isfinite(losses) & (losses > 0)
        log_losses = torch.where(usable, losses, 1.0).log()
        factors = torch.exp(log_losses.mean() - log_losses) / stats.num_groups
        defined = usable.all()
        factors = torch.where(defined, factors, torch.full_like(factors, 1.0 / stats.num_groups))
        return factors, {"undefined": (~defined).to(torch.float64)}

    def metrics(self, state: dict[str, Tensor]) -> dict[str, object]:
        """``undefined``: 1 when the last step had a loss that was unknown or not positive (factors 1/K)."""
        return {"undefined": state["undefined"]}
