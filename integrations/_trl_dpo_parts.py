"""Pieces the two paths of ``BalancedDPOTrainer`` share: the group names, the policy forward that hands
TRL's loss a detached copy of the log-probs, and TRL's ``"sft"`` term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._hf_groups import GroupingError

__all__ = ["CHOSEN", "REJECTED", "PolicyForward", "chosen_nll"]

CHOSEN, REJECTED = "chosen", "rejected"


def chosen_nll(log_probs: Tensor, shift_mask: Tensor) -> Tensor:
    """Mean negative log-prob of the completion tokens (TRL's ``"sft"`` term) of the chosen rows given."""
    return -log_probs[:, -shift_mask.shape[1] :][shift_mask.bool()].mean()


class PolicyForward:
    """Stands in for the policy model in TRL's loss: calls it, keeps its per-token log-probs and
    hands the loss a detached copy (a leaf) instead, so the loss's gradient there is one small pass."""

    def __init__(self, model: torch.nn.Module, *, grad: bool = True) -> None:
        self.model = model
        self.grad = grad
        self.log_probs: Tensor | None = None
        self.leaf: Tensor | None = None
        self.outputs: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.log_probs is not None:
            raise GroupingError(
                "BalancedDPOTrainer: the loss ran the policy model twice in one micro-batch; the chosen/rejected "
                "split needs the log-probs of one forward pass."
            )
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            outputs = self.model(*args, **kwargs)
        log_probs = getattr(outputs, "log_probs", None)
        if not isinstance(log_probs, Tensor) or (self.grad and not log_probs.requires_grad):
            raise GroupingError(
                "BalancedDPOTrainer: the policy forward returned no per-token log-probs with a gradient "
                "(`outputs.log_probs`, which TRL's DPOTrainer requests with fused_lm_head=True)."
            )
        self.outputs, self.log_probs = outputs, log_probs
        self.leaf = log_probs.detach().requires_grad_()
        outputs.log_probs = self.leaf
        return outputs
