"""What a step reports beyond its result: refusals and warnings about non-finite gradients, and
warnings (once per Balancer) about plugins a step left idle or fed without losses."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from balancer.errors import BalancerWarning, NonFiniteGradientError, NonFiniteGradientWarning
from balancer.step.clip import ClipRequest

if TYPE_CHECKING:
    from balancer.capture.source import CaptureSource
    from balancer.optimizer import Balancer
    from balancer.step.plan import StepPlan

__all__ = ["refuse_nonfinite", "report_nonfinite", "warn_missing_losses", "warn_silent_plugins"]


def refuse_nonfinite(source: CaptureSource, plan: StepPlan, total: Tensor, clip: ClipRequest) -> None:
    if bool(torch.isfinite(total).item()):
        return
    if plan.combined:
        source.revert()
    raise NonFiniteGradientError(
        f"The total {clip.norm_type}-norm of the update is {total.item()} (non-finite), so it cannot be clipped; "
        "step refused, nothing changed. Check the ungrouped gradients and the losses, or clip with "
        "error_if_nonfinite=False (the update then carries the NaN/inf, as torch.nn.utils.clip_grad_norm_ does)."
    )


def report_nonfinite(opt: Balancer, bad_names: list[str]) -> None:
    if opt.on_nonfinite == "raise":
        raise NonFiniteGradientError(
            f"Non-finite (NaN/inf) gradients in group(s) {bad_names}; step refused, parameters untouched. "
            "Check these groups' losses, or use on_nonfinite='zero' to drop such groups for the step."
        )
    warnings.warn(
        f"Non-finite (NaN/inf) gradients in group(s) {bad_names}: weight 0 for this step.",
        NonFiniteGradientWarning,
        stacklevel=6,
    )


def _warn_once(opt: Balancer, key: str, message: str) -> None:
    if key not in opt._warned:
        opt._warned.add(key)
        warnings.warn(message, BalancerWarning, stacklevel=6)


def warn_silent_plugins(opt: Balancer, groups: int) -> None:
    """A step with plugins that weigh groups but no group captured, or with plugins that act at
    taps but no tapped gradient, balanced nothing: say so, once each."""
    tapping = [p.name for p in opt.plugins if p.needs_taps]
    if tapping and not opt._pending.taps.seen:
        _warn_once(
            opt,
            "no-taps",
            f"step() ran with plugins {tapping}, which act at taps, but no tapped gradient reached them in "
            "this step, so they did nothing. Fix: pass the tensor they act on through opt.tap(tensor, group=...) "
            "in the forward pass (the logits for replay_bias; balancer.recipes.dpo.tap_pairs for balanced_dpo's prob "
            "rule), and make sure the loss's backward pass goes through it. (Shown once per Balancer.)",
        )
    acting = [p.name for p in opt.plugins if p.acts_on_groups]
    if groups or not acting:
        return
    _warn_once(
        opt,
        "no-groups",
        f"step() ran with plugins {acting}, but no group was captured in this step, so they did nothing: the "
        "update is the plain gradient. Usual causes: a training loop or trainer that calls backward() without "
        "`with opt.group(name):` / `opt.backward({...})` (e.g. transformers.Trainer, Lightning's automatic "
        "optimization, TRL trainers without the balancer integration), or step(closure), whose gradients are "
        "ungrouped. Fix: capture each group's loss inside opt.group(...), or use the framework integration. "
        "(Shown once per Balancer.)",
    )


def warn_missing_losses(opt: Balancer, names: list[str]) -> None:
    """A loss-based plugin on groups whose loss was not recorded falls back to equal weights: say so, once."""
    users = [p.name for p in opt.plugins if p.needs_losses]
    missing = [n for n in names if n not in opt._pending.losses]
    if users and missing:
        _warn_once(
            opt,
            "no-losses",
            f"Plugins {users} weigh groups by their losses, but the losses of groups {missing} were not recorded "
            "this step (they were captured with `with opt.group(name): loss.backward()`), so those groups get "
            "the plugins' fallback weights. Fix: capture with opt.backward({name: loss}) (or backward_tasks / "
            "backward_samples), which records the loss values. (Shown once per Balancer.)",
        )
