"""The step rule of plugins that learn their own parameters (``famo``, ``uncertainty``): Adam or plain
gradient descent on a small vector kept in the plugin state, never handed to the user's optimizer."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

__all__ = ["ADAM_BETAS", "ADAM_EPS", "StepRule", "descend"]

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the anchors' setups use
ADAM_EPS = 1e-8

StepRule = Literal["adam", "sgd"]


def descend(
    rule: StepRule, lr: float, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of ``rule`` on ``param`` with gradient ``grad``, entry by entry: ``(param, exp_avg, exp_avg_sq,
    steps)`` after it. Adam as ``torch.optim.Adam`` computes it (bias-corrected moments, eps outside the square
    root); ``"sgd"``: ``param - lr * grad``, the moments and step counts unchanged."""
    if rule == "sgd":
        return param - lr * grad, exp_avg, exp_avg_sq, steps
    b1, b2 = ADAM_BETAS
    steps = steps + 1.0
    exp_avg = b1 * exp_avg + (1.0 - b1) * grad
    exp_avg_sq = b2 * exp_avg_sq + (1.0 - b2) * grad * grad
    denom = (exp_avg_sq / (1.0 - b2**steps)).sqrt() + ADAM_EPS
    return param - lr * exp_avg / (1.0 - b1**steps) / denom, exp_avg, exp_avg_sq, steps
