"""Running a step of the :class:`~balancer.Balancer`: ``step()`` and ``clip_grad_norm_()``.

:func:`run_step` takes the plan (:func:`balancer.step.plan.plan_step`, or the one ``clip_grad_norm_``
made), writes the update, steps the inner optimizer and commits the plan only if all of it
succeeded; on any error the source reverts ``.grad`` and the plan is dropped, so a retry applies
exactly one update. :func:`clip_step` plans the step early to measure and clip the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from balancer.errors import CaptureError
from balancer.step.clip import ClipRequest, check_clip, clip_in_place, has_update_norm
from balancer.step.plan import StepPlan, check_plan, plan_step

if TYPE_CHECKING:
    from balancer.optimizer import Balancer

__all__ = ["clip_step", "commit", "run_step"]


def run_step(opt: Balancer, closure: Callable[[], Any] | None) -> Any:
    """The body of ``Balancer.step``: plan (or check the early plan), apply, step, commit."""
    active = opt._backend.active
    if active is not None:
        raise CaptureError(f"step() called inside group `{active}`. Call it after the group block.")
    if closure is not None and opt._clip is not None:
        raise CaptureError(
            f"step(closure) with max_grad_norm={opt._clip.max_norm}: the closure's gradients are computed inside "
            "the inner optimizer's step, where the Balancer cannot clip them. Clip inside the closure instead, "
            "after its backward pass: `opt.clip_grad_norm_(max_norm)` (it clips .grad there, as torch does)."
        )
    grad_scale: Tensor | None = getattr(opt, "grad_scale", None)
    found_inf: Tensor | None = getattr(opt, "found_inf", None)
    pending = opt._pending
    source = pending.source
    if found_inf is not None and grad_scale is None and source.names:
        raise CaptureError(
            "scaler.unscale_(opt) was called before scaler.step(opt): it unscales only the ungrouped "
            "gradients. Call scaler.step(opt) directly (the Balancer unscales group gradients itself); to "
            "clip, use Balancer(..., max_grad_norm=c) or opt.clip_grad_norm_(c, scaler=scaler) instead."
        )
    plan = pending.plan
    if plan is None:
        plan = plan_step(opt, opt._clip, grad_scale, found_inf)
    else:
        check_plan(opt, plan, source, grad_scale, found_inf)
    if plan.skip:
        source.revert()
        pending.taps.discard()
        pending.forget_plan()
        return None  # AMP overflow: skip, plugin state untouched; the scaler backs off
    try:
        if not plan.combined:
            weights = plan.weights
            if weights is None:
                weights = torch.zeros(0, dtype=torch.float64, device=source.stats_device)
            source.combine(weights, scale=plan.factor, rule=plan.rule)
        if closure is not None:
            with torch.enable_grad():
                result = opt._backend.optimizer_step(closure)
        else:
            result = opt._backend.optimizer_step()
    except BaseException:
        source.revert()
        pending.forget_plan()
        raise
    commit(opt, plan)
    return result


def commit(opt: Balancer, plan: StepPlan) -> None:
    """The step succeeded: its plugin states and stats become the Balancer's; the pending step is forgotten."""
    opt._plugin_states = plan.states
    opt.last_stats = plan.stats
    opt._rows_seen = max(opt._rows_seen, len(plan.names))
    opt._pending.end_step()
    opt._step_count += 1


def clip_step(opt: Balancer, request: ClipRequest, scaler: Any) -> Tensor:
    """The body of ``Balancer.clip_grad_norm_``: plans the step now and returns the update's norm."""
    if opt._backend.active is not None:
        raise CaptureError(f"clip_grad_norm_() called inside group `{opt._backend.active}`: call it after.")
    if opt._clip is not None:
        raise CaptureError(
            f"This Balancer already clips every step to max_grad_norm={opt._clip.max_norm}; calling "
            "clip_grad_norm_ as well would clip twice. Use one of them."
        )
    check_clip(opt._backend, request, "clip_grad_norm_")
    pending = opt._pending
    if pending.plan is not None:
        raise CaptureError("clip_grad_norm_() was already called in this step; call it once, before step().")
    source = pending.source
    scale = 1.0 / float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
    if not source.names and has_update_norm(opt._backend):  # nothing grouped: clip .grad as torch does
        return clip_in_place(opt._backend, request, 1.0 if scale is None else scale)
    grad_scale = None if scale is None else torch.tensor(1.0 / scale, dtype=torch.float64)
    plan = pending.plan = plan_step(opt, request, grad_scale, None)
    plan.token = source.capture_token()
    if plan.grad_norm is None:  # AMP: a non-finite group; scaler.step(opt) will skip the step
        return torch.tensor(float("inf"), dtype=torch.float64, device=source.stats_device)
    return plan.grad_norm
