"""The one host synchronisation of a step: which groups are non-finite, which Gram rows to
refine, the GradScaler's overflow flag and its scale (the plugin chain is
:class:`~balancer.contract.chain.Chain`)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the step needs to know on the host, read in one synchronisation."""

    nonfinite: list[bool]  # per group: NaN/inf in its gradient
    overflow: bool  # the GradScaler found inf/NaN in the ungrouped gradients
    scale: float  # 1 / the GradScaler's scale (1.0 without AMP)
    suspect: list[int] = dataclasses.field(default_factory=list)  # Gram rows to refine (non-finite or underflowed)


def read_verdict(
    gram: Tensor | None,
    groups: int,
    found_inf: Tensor | None,
    grad_scale: Tensor | None,
    device: torch.device,
    floor: float = 0.0,
) -> Verdict:
    """One host sync: which groups are non-finite, which Gram rows (``groups`` groups, then the
    ungrouped gradient if ``gram`` includes it) may be wrong in the fast path (a diagonal entry
    that is not finite or below ``floor``), the GradScaler's overflow flag and its scale."""
    parts = [torch.zeros(0, dtype=torch.float64, device=device)]
    size = 0 if gram is None else gram.shape[0]
    if gram is not None:
        diag = gram.diagonal().to(device)
        parts.append((~torch.isfinite(diag)).to(torch.float64))
        parts.append((diag < floor).to(torch.float64))
    for value in (found_inf, grad_scale):
        if value is not None:
            parts.append(value.to(device=device, dtype=torch.float64).reshape(1))
    values = torch.cat(parts).tolist()
    bad, low, rest = values[:size], values[size : 2 * size], values[2 * size :]
    overflow = bool(rest.pop(0)) if found_inf is not None else False
    scale = 1.0 / rest.pop(0) if grad_scale is not None else 1.0
    suspect = [i for i in range(size) if bad[i] or low[i]]
    return Verdict([bool(v) for v in bad[:groups]], overflow, scale, suspect)
