"""What a tap plugin sees: one gradient arriving at a tapped tensor (``opt.tap``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["TapEvent"]


@dataclasses.dataclass(frozen=True)
class TapEvent:
    """One gradient arriving at a tapped tensor.

    Attributes:
        grad: the gradient arriving at the tapped tensor (its shape; rows along dimension 0).
            Under a ``GradScaler`` it carries the loss scale: statistics should be ratios.
        value: the tapped tensor's forward value, detached.
        names: the distinct groups of the rows, in order of first appearance.
        group_index: ``[rows]`` long tensor; row ``i`` belongs to ``names[group_index[i]]``.
        labels: the ``labels`` given to ``opt.tap`` (rows along dimension 0), or ``None``.
    """

    grad: Tensor
    value: Tensor
    names: tuple[str, ...]
    group_index: Tensor
    labels: Tensor | None

    @property
    def num_rows(self) -> int:
        return self.group_index.shape[0]

    def rows_of(self, *groups: str) -> Tensor:
        """``[rows]`` bool mask of the rows in any of ``groups`` (all false for absent groups)."""
        ids = [self.names.index(g) for g in groups if g in self.names]
        if not ids:
            return torch.zeros(self.num_rows, dtype=torch.bool, device=self.group_index.device)
        return torch.isin(self.group_index, torch.tensor(ids, device=self.group_index.device))
