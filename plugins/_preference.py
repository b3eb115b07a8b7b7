"""What the scalarizer plugins share (``cosmos``, ``pbi``, ``stch``): a preference per group name, a
reference point per group name, and the weights ``∂S/∂L_i`` of a scalarization ``S`` of the losses.

A scalarizer minimises ``S(L)`` of the vector of the groups' losses; its gradient is
``Σ_i (∂S/∂L_i) ∇L_i``, so as a plugin it returns ``a_i = ∂S/∂L_i`` at the losses the Balancer
recorded (``stats.losses``, from ``opt.backward({...})``). torchjd takes its preference vector and
reference point by position; groups here are named and may come in any order or be absent, so both
are mappings from group name (the preference with an optional ``default``, the reference with 0 for
a group it does not name). The lookups are Python work on the names: no device tensor is read.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting
from balancer.errors import PluginError

from ._options import refuse_ignored

__all__ = ["PreferenceOptions", "ReferenceOptions", "Scalarization", "preference_of", "reference_of"]


class PreferenceOptions(PluginOptions):
    """A preference weight per group name."""

    preference: dict[str, float] | None = Field(
        None, description="The preference weight (≥ 0) of each group, by name; None: 1/k for each of the k groups."
    )
    default: float | None = Field(
        None, ge=0.0, description="The preference of a group not named in `preference`; None: such a group is an error."
    )

    @model_validator(mode="after")
    def _check_preference(self) -> PreferenceOptions:
        if self.preference is None:
            refuse_ignored(self, ["default"], "with preference=None (every group then has 1/k)", "Drop it.")
            return self
        bad = {n: v for n, v in self.preference.items() if not (math.isfinite(v) and v >= 0.0)}
        if bad:
            raise ValueError(f"preference weights must be finite and not negative; found {bad}.")
        if not self.preference and self.default is None:
            raise ValueError(
                "preference is empty and there is no default: name the groups' preferences, or set default."
            )
        if not any(self.preference.values()) and not self.default:
            raise ValueError("every preference (and the default) is 0: the scalarization would be constant.")
        return self


class ReferenceOptions(PreferenceOptions):
    """A preference and a reference (ideal) point per group name."""

    reference: float | dict[str, float] = Field(
        0.0, description="The reference (ideal) point z*: one value, or one per group name (missing names: 0)."
    )

    @model_validator(mode="after")
    def _check_reference(self) -> ReferenceOptions:
        values = [self.reference] if isinstance(self.reference, float | int) else list(self.reference.values())
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"the reference point must be finite; found {bad}.")
        return self


def preference_of(plugin: str, options: PreferenceOptions, names: Sequence[str], device: torch.device) -> Tensor:
    """``[k]`` float64 preference of the groups ``names``; raises :class:`PluginError` for a group with no
    preference and for a step whose groups all have preference 0."""
    k = len(names)
    if options.preference is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
    known, default = options.preference, options.default
    unknown = [n for n in names if n not in known]
    if unknown and default is None:
        raise PluginError(
            f"{plugin} has no preference for groups {unknown} (it has preferences for {sorted(known)}). Add them "
            "to `preference`, or set `default` to the preference of the groups it does not name."
        )
    values = [float(known.get(n, default or 0.0)) for n in names]
    if not any(values):
        raise PluginError(
            f"{plugin}: every group of this step ({list(names)}) has preference 0, so the scalarization is "
            "constant and the step would balance nothing. Give one of them a positive preference."
        )
    return torch.tensor(values, dtype=torch.float64).to(device)


def reference_of(options: ReferenceOptions, names: Sequence[str], device: torch.device) -> Tensor | float:
    """The reference point of the groups ``names``: a float, or a ``[k]`` float64 tensor."""
    ref = options.reference
    if isinstance(ref, float | int):
        return float(ref)
    return torch.tensor([float(ref.get(n, 0.0)) for n in names], dtype=torch.float64).to(device)


class Scalarization(GramWeighting[dict[str, Tensor]]):
    """Base of the scalarizer plugins: the factors are ``∂S/∂L`` at the recorded losses (module docs).

    Where the gradient is not defined (a loss unknown, ``nan``, because its group ran outside
    ``opt.backward``, the Balancer warns once, ``needs_losses``; a loss that is not finite; or a
    point where the subclass's formula is undefined) the step's factors are the subclass's
    fallback, and the metric ``undefined`` is 1 for that step. Stateless otherwise.
    """

    options: PreferenceOptions
    needs_losses = True

    @abc.abstractmethod
    def gradient(self, losses: Tensor, preference: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(∂S/∂L, fallback)`` at finite float64 ``losses``: ``[k]`` tensors; entries of ``∂S/∂L`` that are
        not finite mark the point as undefined."""

    def init(self) -> dict[str, Tensor]:
        return {"undefined": torch.zeros((), dtype=torch.float64)}

    def weigh(self, stats: GroupStats, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        preference = preference_of(self.name, self.options, stats.names, stats.gram.device)
        losses = stats.losses.to(torch.float64)
        known = torch.isfinite(losses)
        factors, fallback = self.gradient(torch.where(known, losses, 0.0), preference, stats.names)
        defined = known.all() & torch.isfinite(factors).all()
        return torch.where(defined, factors, fallback), {"undefined": (~defined).to(torch.float64)}

    def metrics(self, state: dict[str, Tensor]) -> dict[str, object]:
        """``undefined``: 1 when the last step's gradient was not defined (the fallback factors were used)."""
        return {"undefined": state["undefined"]}
