"""``constant``: fixed weights per group name, as torchjd's ``Constant`` (keyed by name, not by row)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting
from balancer.errors import PluginError

__all__ = ["Constant", "ConstantOptions"]


class ConstantOptions(PluginOptions):
    """Options of :class:`Constant`."""

    weights: dict[str, float] = Field(description="The weight of each group, by name.")
    default: float | None = Field(
        None, description="The weight of a group not named in `weights`; None: such a group is an error."
    )

    @model_validator(mode="after")
    def _check(self) -> ConstantOptions:
        values = list(self.weights.values()) + ([] if self.default is None else [self.default])
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"weights and default must be finite numbers; found {bad}.")
        if not self.weights and self.default is None:
            raise ValueError("weights is empty and there is no default: name every group's weight, or set default.")
        if all(v == 1.0 for v in values):
            raise ValueError(
                "every weight (and the default) is 1, which leaves every weight unchanged: drop the plugin, "
                "or give the groups their weights."
            )
        return self


class Constant(GramWeighting[State]):
    """Fixed, user-given weights per group name: the update is ``Σ_k c_{name(k)} g_k``.

    torchjd 0.18's ``Constant`` (a weighted sum with constant, pre-determined weights, the baseline
    of linear scalarisation ``Σ_k c_k L_k``) takes one weight per row of the Jacobian; groups here
    are named and may come in any order or be absent, so the weights are a mapping from group name
    to weight, and ``default`` (if set) weighs any group it does not name. A group that is neither
    named nor covered by a default raises :class:`~balancer.errors.PluginError` naming it (a Python
    check of the names: no tensor is read). A weight may be any finite number (0 drops a group,
    a negative one ascends its loss). With incoming weights ``w`` it returns ``w * c``; placed first,
    the weights are ``c`` themselves, as torchjd's.

    Example::

        opt = Balancer(inner, plugins=[("constant", {"weights": {"math": 2.0, "code": 0.5}})])
        ...
        opt.step()
    """

    name = "constant"
    Options = ConstantOptions
    options: ConstantOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        known, default = self.options.weights, self.options.default
        unknown = [n for n in stats.names if n not in known]
        if unknown and default is None:
            raise PluginError(
                f"constant has no weight for groups {unknown} (it has weights for {sorted(known)}). Add them to "
                "`weights`, or set `default` to the weight of groups it does not name."
            )
        values = [known.get(n, default) for n in stats.names]
        return torch.tensor(values, dtype=torch.float64).to(stats.gram.device), state
