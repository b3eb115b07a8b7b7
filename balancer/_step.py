"""One step of the :class:`~balancer.Balancer`, planned before anything is written.

:func:`plan_step` reads the step's statistics, runs the plugins and computes the clip, changing
nothing the user can see: the result is a :class:`StepPlan` (weights, the plugin states the step
would leave, the factor the update gets, what ``last_stats`` becomes). ``Balancer.step`` then
applies it (one combination, the inner optimizer's step) and commits it only when everything
succeeded; if anything raises, the backend reverts ``.grad`` and the plan is dropped, so a retry
applies exactly one update. ``Balancer.clip_grad_norm_`` plans the step early to return the norm,
and ``step`` uses that plan.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from balancer._clip import ClipRequest, clip_coefficient, gram_norm, has_update_norm
from balancer._weighting import Verdict, read_verdict, run_plugins
from balancer.contract.backend import Backend
from balancer.contract.plugin import State
from balancer.contract.stats import GroupStats
from balancer.errors import BalancerWarning, CaptureError, NonFiniteGradientError, NonFiniteGradientWarning

if TYPE_CHECKING:
    from balancer.optimizer import Balancer

__all__ = [
    "StepPlan",
    "check_plan",
    "check_token",
    "clip_route",
    "measure",
    "measured_clip",
    "plan_step",
    "trusted_verdict",
]

_CHECKED = "checked"  # a plan's capture token once checked (the GradScaler's own check changes .grad)


@dataclasses.dataclass
class StepPlan:
    """What one step will do; nothing of it is visible until ``Balancer.step`` commits it."""

    names: tuple[str, ...]
    verdict: Verdict
    weights: Tensor | None = None  # one per group (0 for dropped groups), before scale and clip
    states: dict[str, State] = dataclasses.field(default_factory=dict)  # plugin states after the step
    stats: GroupStats | None = None  # what last_stats becomes
    factor: float | Tensor = 1.0  # the update's factor: the GradScaler's 1/scale times the clip coefficient
    combined: bool = False  # the update is written already (clipped through the combined update)
    skip: bool = False  # AMP overflow: skip the step, as GradScaler expects
    token: Any = None  # the backend's capture token when the plan was made
    grad_norm: Tensor | None = None


def measured_clip(opt: Balancer, clip: ClipRequest | None) -> ClipRequest | None:
    """The clip a step measures: the one asked for, else the framework's own (DeepSpeed's
    ``gradient_clipping``, which the step only reports), else none."""
    if clip is not None:
        return clip
    report = opt._backend.framework_clipping()
    return None if report is None else ClipRequest.make(report)


def clip_route(source: Backend, clip: ClipRequest | None, groups: int) -> str | None:
    """``"gram"`` (L2 from the Gram matrix), ``"combined"`` (norm of the written update) or None."""
    if clip is None:
        return None
    if clip.euclidean and source.ungrouped_gram and (groups > 0 or not has_update_norm(source)):
        return "gram"
    return "combined"


def measure(opt: Balancer, source: Backend, ungrouped: bool) -> tuple[Tensor, bool]:
    """The step's Gram matrix, computed once per step (``_step_supports_amp_scaling`` may ask
    first), and whether it was refined already."""
    cached = opt._measured
    if cached is not None and cached[1] == ungrouped:
        return cached[0], cached[2]
    gram = source.gram(ungrouped=ungrouped)
    opt._measured = (gram, ungrouped, False)
    return gram, False


def trusted_verdict(
    opt: Balancer, source: Backend, ungrouped: bool, groups: int, found_inf: Tensor | None, grad_scale: Tensor | None
) -> tuple[Tensor, Verdict]:
    """The Gram matrix and the verdict (one host sync). On the rare steps whose fast Gram may be
    wrong (a diagonal entry not finite or below the backend's floor), the suspect rows are
    refined and the verdict read again."""
    gram, refined = measure(opt, source, ungrouped)
    device = source.stats_device
    verdict = read_verdict(gram, groups, found_inf, grad_scale, device, 0.0 if refined else source.gram_floor)
    if verdict.suspect and not refined:
        gram = source.refine_gram(gram, verdict.suspect)
        opt._measured = (gram, ungrouped, True)
        verdict = read_verdict(gram, groups, found_inf, grad_scale, device, 0.0)
    return gram, verdict


def plan_step(opt: Balancer, clip: ClipRequest | None, grad_scale: Tensor | None, found_inf: Tensor | None) -> StepPlan:
    """Plans the step: statistics, verdict, plugins, clip. Writes nothing but, on the combined
    clip route, the update itself (reverted by the caller if the step fails)."""
    source = opt._source()
    names = source.names
    k = len(names)
    report_only = clip is None  # a clip measured but not applied: the framework applies it
    clip = measured_clip(opt, clip)
    route = clip_route(source, clip, k)
    gram = None
    if k or route == "gram":
        gram, verdict = trusted_verdict(opt, source, route == "gram", k, found_inf, grad_scale)
    else:
        verdict = read_verdict(None, 0, found_inf, grad_scale, source.stats_device)
    nonfinite = [bad or name in opt._dropped for name, bad in zip(names, verdict.nonfinite, strict=True)]
    verdict = dataclasses.replace(verdict, nonfinite=nonfinite)
    plan = StepPlan(names=names, verdict=verdict, factor=verdict.scale)
    if verdict.overflow or (grad_scale is not None and any(nonfinite)):
        plan.skip = True  # AMP overflow: skip, plugin state untouched; the scaler backs off
        return plan
    _warn_silent_plugins(opt, k)
    plan.states = opt._taps.merge(opt._plugin_states, opt._backend)
    device = source.stats_device
    if k:
        assert gram is not None
        plan.weights, plan.states, plan.stats = _weigh(opt, names, gram[:k, :k] * verdict.scale**2, plan)
    if clip is None:
        return plan
    weights = plan.weights if plan.weights is not None else torch.zeros(0, dtype=torch.float64, device=device)
    if route == "gram":
        assert gram is not None
        total = gram_norm(gram, weights, verdict.scale, nonfinite)
    else:
        source.combine(weights, scale=verdict.scale)
        plan.combined = True
        total = source.update_norm(clip.norm_type)
    coef = clip_coefficient(total, clip.max_norm)
    if clip.error_if_nonfinite or opt.on_nonfinite == "raise":
        _refuse_nonfinite(source, plan, total, clip)
    if not report_only:
        if plan.combined:
            source.scale_update(coef)
        else:
            plan.factor = coef * verdict.scale
    plan.grad_norm = total
    if plan.stats is not None:
        plan.stats = dataclasses.replace(plan.stats, grad_norm=total, clip_coef=coef)
    return plan


def check_token(opt: Balancer, plan: StepPlan, source: Backend) -> None:
    """Refuses a plan whose gradients changed since ``clip_grad_norm_`` measured them."""
    if plan.token != _CHECKED and source.capture_token() != plan.token:
        opt._plan = None
        raise CaptureError(
            "A backward pass added gradients after opt.clip_grad_norm_() measured the update, so the clip "
            "would be wrong. Clip after the last backward pass of the step, right before step()."
        )
    plan.token = _CHECKED


def check_plan(
    opt: Balancer, plan: StepPlan, source: Backend, grad_scale: Tensor | None, found_inf: Tensor | None
) -> None:
    """The plan ``clip_grad_norm_`` made must fit the step being taken: same gradients, same scale."""
    check_token(opt, plan, source)
    measured = plan.verdict.scale
    scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale.item())
    if scale != measured:
        opt._plan = None
        raise CaptureError(
            f"opt.clip_grad_norm_() measured the gradients at loss scale {1 / measured:g}, but step() received "
            f"them at scale {1 / scale:g}. With a GradScaler pass it: opt.clip_grad_norm_(c, scaler=scaler), "
            "then scaler.step(opt); without one, call opt.step() directly."
        )
    if found_inf is not None and bool(found_inf.item()):
        plan.skip = True


def _weigh(
    opt: Balancer, names: tuple[str, ...], gram: Tensor, plan: StepPlan
) -> tuple[Tensor, dict[str, State], GroupStats]:
    """Stats of the present groups and the plugins' weights; non-finite groups get weight 0."""
    device = gram.device
    source = opt._source()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    losses = source.reduce_losses(torch.stack([opt._losses.get(n, nan).to(device) for n in names]))
    calls = tuple(opt._captures.get(n, 0) for n in names)
    full = GroupStats(names=names, gram=gram, losses=losses, backward_calls=calls, step=opt._step_count)
    dropped = [i for i, bad in enumerate(plan.verdict.nonfinite) if bad]
    if dropped:
        _report_nonfinite(opt, [names[i] for i in dropped])
    keep = [i for i, bad in enumerate(plan.verdict.nonfinite) if not bad]
    _warn_missing_losses(opt, [names[i] for i in keep])
    states = plan.states
    if not keep:  # every group is non-finite: nothing to weigh, the plugins are not asked
        weights = torch.zeros(0, dtype=torch.float64, device=device)
    else:
        weights, states = run_plugins(opt.plugins, states, full.select(keep) if dropped else full)
    full_weights = weights
    if dropped:
        index = torch.tensor(keep, dtype=torch.long, device=device)
        full_weights = torch.zeros(len(names), dtype=torch.float64, device=device).index_copy(0, index, weights)
        opt._dropped.update(names[i] for i in dropped)
        source.drop(dropped)
    return full_weights, states, dataclasses.replace(full, weights=full_weights)


def _refuse_nonfinite(source: Backend, plan: StepPlan, total: Tensor, clip: ClipRequest) -> None:
    if bool(torch.isfinite(total).item()):
        return
    if plan.combined:
        source.revert()
    raise NonFiniteGradientError(
        f"The total {clip.norm_type}-norm of the update is {total.item()} (non-finite), so it cannot be clipped; "
        "step refused, nothing changed. Check the ungrouped gradients and the losses, or clip with "
        "error_if_nonfinite=False (the update then carries the NaN/inf, as torch.nn.utils.clip_grad_norm_ does)."
    )


def _report_nonfinite(opt: Balancer, bad_names: list[str]) -> None:
    if opt.on_nonfinite == "raise":
        raise NonFiniteGradientError(
            f"Non-finite (NaN/inf) gradients in group(s) {bad_names}; step refused, parameters untouched. "
            "Check these groups' losses, or use on_nonfinite='zero' to drop such groups for the step."
        )
    warnings.warn(
        f"Non-finite (NaN/inf) gradients in group(s) {bad_names}: weight 0 for this step.",
        NonFiniteGradientWarning,
        stacklevel=5,
    )


def _warn_once(opt: Balancer, key: str, message: str) -> None:
    if key not in opt._warned:
        opt._warned.add(key)
        warnings.warn(message, BalancerWarning, stacklevel=5)


def _warn_silent_plugins(opt: Balancer, groups: int) -> None:
    """A step with plugins that weigh groups but no group captured, or with plugins that act at
    taps but no tapped gradient, balanced nothing: say so, once each."""
    tapping = [p.name for p in opt.plugins if p.needs_taps]
    if tapping and not opt._taps.seen:
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


def _warn_missing_losses(opt: Balancer, names: list[str]) -> None:
    """A loss-based plugin on groups whose loss was not recorded falls back to equal weights: say so, once."""
    users = [p.name for p in opt.plugins if p.needs_losses]
    missing = [n for n in names if n not in opt._losses]
    if users and missing:
        _warn_once(
            opt,
            "no-losses",
            f"Plugins {users} weigh groups by their losses, but the losses of groups {missing} were not recorded "
            "this step (they were captured with `with opt.group(name): loss.backward()`), so those groups get "
            "the plugins' fallback weights. Fix: capture with opt.backward({name: loss}) (or backward_tasks / "
            "backward_samples), which records the loss values. (Shown once per Balancer.)",
        )
