"""``GroupStats``: what plugins see of the group gradients in one step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GroupStats"]


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Per-group statistics of one optimizer step.

    Attributes:
        names: the groups present in this step, in the order they first received gradients.
        gram: ``[k, k]`` float64 Gram matrix ``G = A Aᵀ`` of the group gradients (row ``i`` of ``A``
            is ``g_i``, flattened over every trained parameter). Under data parallelism it is the
            exact global matrix. Norms and cosines follow from it.
        losses: ``[k]`` float64 tensor of the summed loss values each group passed to
            ``Balancer.backward`` in this step; ``nan`` where a group's loss was not seen.
        backward_calls: how many backward passes each group ran in this step.
        step: the number of optimizer steps taken before this one (0 for the first step).
        weights: the weights applied in this step (set on ``Balancer.last_stats``; ``None`` while
            plugins are still running).
        grad_norm: the total norm of the update the inner optimizer received, before clipping
            (``ungrouped + Σ_k w_k g_k``, unscaled under a ``GradScaler``), as a 0-d float64 tensor;
            ``None`` when the step did not clip (no ``max_grad_norm``, no ``clip_grad_norm_``).
        clip_coef: the factor the update was multiplied by, ``min(1, max_norm / (grad_norm + 1e-6))``
            as in ``torch.nn.utils.clip_grad_norm_``; ``None`` when the step did not clip.
    """

    names: tuple[str, ...]
    gram: Tensor
    losses: Tensor
    backward_calls: tuple[int, ...]
    step: int
    weights: Tensor | None = None
    grad_norm: Tensor | None = None
    clip_coef: Tensor | None = None

    @classmethod
    def from_gram(
        cls,
        gram: Tensor,
        names: Sequence[str] | None = None,
        *,
        losses: Tensor | Sequence[float] | None = None,
        step: int = 0,
    ) -> GroupStats:
        """Builds stats from a Gram matrix alone: handy to test plugins without a model."""
        gram = torch.as_tensor(gram, dtype=torch.float64)
        k = gram.shape[0]
        if gram.shape != (k, k):
            raise ValueError(f"`gram` must be a square matrix. Found `gram.shape = {tuple(gram.shape)}`.")
        names = tuple(names) if names is not None else tuple(f"g{i}" for i in range(k))
        if len(names) != k:
            raise ValueError(f"Got {len(names)} names for a {k}x{k} Gram matrix.")
        if losses is None:
            loss_t = torch.full((k,), float("nan"), dtype=torch.float64, device=gram.device)
        else:
            loss_t = torch.as_tensor(losses, dtype=torch.float64, device=gram.device)
        return cls(names=names, gram=gram, losses=loss_t, backward_calls=(1,) * k, step=step)

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def sq_norms(self) -> Tensor:
        """Squared gradient norms ``‖g_k‖²`` (the diagonal of the Gram matrix)."""
        return self.gram.diagonal().clamp_min(0.0)

    @property
    def norms(self) -> Tensor:
        """Gradient norms ``‖g_k‖``."""
        return self.sq_norms.sqrt()

    @property
    def cosines(self) -> Tensor:
        """Pairwise cosine similarities; 0 where a gradient is zero."""
        norms = self.norms
        outer = norms[:, None] * norms[None, :]
        safe = torch.where(outer > 0, outer, torch.ones_like(outer))
        return torch.where(outer > 0, self.gram / safe, torch.zeros_like(outer))

    def select(self, rows: Sequence[int]) -> GroupStats:
        """The stats of a subset of the groups, in the given order."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.gram.device)
        return dataclasses.replace(
            self,
            names=tuple(self.names[i] for i in rows),
            gram=self.gram.index_select(0, index).index_select(1, index),
            losses=self.losses.index_select(0, index),
            backward_calls=tuple(self.backward_calls[i] for i in rows),
            weights=None if self.weights is None else self.weights.index_select(0, index),
        )

    def index(self, name: str) -> int:
        """Row of group ``name``."""
        return self.names.index(name)

    def to_dict(self) -> dict[str, object]:
        """Plain Python numbers for logging (this synchronises with the device: not for hot paths)."""
        out: dict[str, object] = {
            "step": self.step,
            "names": list(self.names),
            "norms": self.norms.tolist(),
            "cosines": self.cosines.tolist(),
            "losses": self.losses.tolist(),
            "backward_calls": list(self.backward_calls),
        }
        if self.weights is not None:
            out["weights"] = self.weights.tolist()
        for name in ("grad_norm", "clip_coef"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.item()
        return out
