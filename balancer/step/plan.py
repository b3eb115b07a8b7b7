"""One step of the :class:`~balancer.Balancer`, planned before anything is written.

:func:`plan_step` reads the step's statistics, runs the plugins and computes the clip, changing
nothing the user can see: the result is a :class:`StepPlan` (weights, the plugin states the step
would leave, the factor the update gets, what ``last_stats`` becomes). :mod:`balancer.step.run`
then applies it (one combination, the inner optimizer's step) and commits it only when everything
succeeded; if anything raises, the source reverts ``.grad`` and the plan is dropped, so a retry
applies exactly one update. ``Balancer.clip_grad_norm_`` plans the step early to return the norm,
and ``step`` uses that plan.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from balancer.contract.chain import run_plugins
from balancer.contract.combine import BoundRule, find_combine_rule
from balancer.contract.plugin import State
from balancer.contract.stats import GroupStats
from balancer.errors import CaptureError
from balancer.step.clip import ClipRequest, clip_coefficient, gram_norm, has_update_norm
from balancer.step.notices import refuse_nonfinite, report_nonfinite, warn_missing_losses, warn_silent_plugins
from balancer.step.verdict import Verdict, read_verdict

if TYPE_CHECKING:
    from balancer.capture.source import CaptureSource
    from balancer.optimizer import Balancer

__all__ = [
    "StepPlan",
    "check_plan",
    "check_token",
    "clip_route",
    "measure",
    "measured_clip",
    "plan_step",
    "show_scaler",
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
    rule: BoundRule | None = None  # the combine rule with its new state, in place of the GEMV


def measured_clip(opt: Balancer, clip: ClipRequest | None) -> ClipRequest | None:
    """The clip a step measures: the one asked for, else the framework's own (DeepSpeed's
    ``gradient_clipping``, which the step only reports), else none."""
    if clip is not None:
        return clip
    report = opt._backend.framework_clipping()
    return None if report is None else ClipRequest.make(report)


def clip_route(source: CaptureSource, clip: ClipRequest | None, groups: int, rule: bool = False) -> str | None:
    """``"gram"`` (L2 from the Gram matrix), ``"combined"`` (norm of the written update) or None.
    With a combine rule (``rule``) the update is not ``Σ w_k g_k``, so ``wᵀGw`` is not its norm: combined."""
    if clip is None:
        return None
    if rule and groups > 0:
        return "combined"
    if clip.euclidean and source.ungrouped_gram and (groups > 0 or not has_update_norm(source)):
        return "gram"
    return "combined"


def measure(opt: Balancer, source: CaptureSource, ungrouped: bool) -> tuple[Tensor, bool]:
    """The step's Gram matrix, computed once per step (:func:`show_scaler` may ask
    first), and whether it was refined already."""
    cached = opt._pending.measured
    if cached is not None and cached[1] == ungrouped:
        return cached[0], cached[2]
    gram = source.gram(ungrouped=ungrouped)
    opt._pending.measured = (gram, ungrouped, False)
    return gram, False


def trusted_verdict(
    opt: Balancer,
    source: CaptureSource,
    ungrouped: bool,
    groups: int,
    found_inf: Tensor | None,
    grad_scale: Tensor | None,
) -> tuple[Tensor, Verdict]:
    """The Gram matrix and the verdict (one host sync). On the rare steps whose fast Gram may be
    wrong (a diagonal entry not finite or below the backend's floor), the suspect rows are
    refined and the verdict read again."""
    gram, refined = measure(opt, source, ungrouped)
    device = source.stats_device
    verdict = read_verdict(gram, groups, found_inf, grad_scale, device, 0.0 if refined else source.gram_floor)
    if verdict.suspect and not refined:
        gram = source.refine_gram(gram, verdict.suspect)
        opt._pending.measured = (gram, ungrouped, True)
        verdict = read_verdict(gram, groups, found_inf, grad_scale, device, 0.0)
    return gram, verdict


def plan_step(opt: Balancer, clip: ClipRequest | None, grad_scale: Tensor | None, found_inf: Tensor | None) -> StepPlan:
    """Plans the step: statistics, verdict, plugins, clip. Writes nothing but, on the combined
    clip route, the update itself (reverted by the caller if the step fails)."""
    source = opt._pending.source
    names = source.names
    k = len(names)
    report_only = clip is None  # a clip measured but not applied: the framework applies it
    clip = measured_clip(opt, clip)
    rule = find_combine_rule(opt.plugins) if k else None
    if rule is not None and not getattr(source, "combine_rules", False):
        raise CaptureError(
            f"Combine rule `{rule.name}` computes the update from the group rows, which the layer capture "
            "(backward_samples/backward_tasks) does not keep. Capture with opt.group(...) or opt.backward(...)."
        )
    route = clip_route(source, clip, k, rule is not None)
    gram = None
    if k or route == "gram":
        gram, verdict = trusted_verdict(opt, source, route == "gram", k, found_inf, grad_scale)
    else:
        verdict = read_verdict(None, 0, found_inf, grad_scale, source.stats_device)
    nonfinite = [bad or name in opt._pending.dropped for name, bad in zip(names, verdict.nonfinite, strict=True)]
    verdict = dataclasses.replace(verdict, nonfinite=nonfinite)
    plan = StepPlan(names=names, verdict=verdict, factor=verdict.scale)
    if verdict.overflow or (grad_scale is not None and any(nonfinite)):
        plan.skip = True  # AMP overflow: skip, plugin state untouched; the scaler backs off
        return plan
    warn_silent_plugins(opt, k)
    plan.states = opt._pending.taps.merge(opt._plugin_states, opt._backend)
    device = source.stats_device
    if k:
        assert gram is not None
        plan.weights, plan.states, plan.stats = _weigh(opt, names, gram[:k, :k] * verdict.scale**2, plan)
        keep = [i for i, bad in enumerate(nonfinite) if not bad]
        if rule is not None and keep:  # dropped groups are left out of the rule, not counted as zeros
            plan.rule = BoundRule(rule, plan.states[rule.name], None if len(keep) == k else keep)
    if clip is None:
        return plan
    weights = plan.weights if plan.weights is not None else torch.zeros(0, dtype=torch.float64, device=device)
    if route == "gram":
        assert gram is not None
        total = gram_norm(gram, weights, verdict.scale, nonfinite)
    else:
        source.combine(weights, scale=verdict.scale, rule=plan.rule)
        plan.combined = True
        total = source.update_norm(clip.norm_type)
    coef = clip_coefficient(total, clip.max_norm)
    if clip.error_if_nonfinite or opt.on_nonfinite == "raise":
        refuse_nonfinite(source, plan, total, clip)
    if not report_only:
        if plan.combined:
            source.scale_update(coef)
        else:
            plan.factor = coef * verdict.scale
    plan.grad_norm = total
    if plan.stats is not None:
        plan.stats = dataclasses.replace(plan.stats, grad_norm=total, clip_coef=coef)
    return plan


def show_scaler(opt: Balancer) -> None:
    """Lets a ``GradScaler`` see the group gradients, which sit in their source, not in ``.grad``.

    ``GradScaler.step`` reads ``_step_supports_amp_scaling`` right before it checks ``.grad`` for
    inf/NaN: the ungrouped grads go to ``.grad`` and, if any group is non-finite, a NaN is planted
    there (no host sync) so that the scaler skips the step and backs off. The scaler then passes
    ``grad_scale``; the step folds 1/scale into the combination.
    """
    source = opt._pending.source
    k = len(source.names)
    if not k or opt._backend.active is not None:
        return
    plan = opt._pending.plan
    poison: bool | Tensor
    if plan is not None:  # clip_grad_norm_(scaler=...) planned the step
        check_token(opt, plan, source)
        poison = plan.skip
    else:  # no host sync here: a Gram row that is not finite makes the scaler skip and back off
        route = clip_route(source, measured_clip(opt, opt._clip), k, find_combine_rule(opt.plugins) is not None)
        gram, _ = measure(opt, source, route == "gram")
        dropped = any(name in opt._pending.dropped for name in source.names)
        poison = (~torch.isfinite(gram.diagonal()[:k]).all()) | dropped
    if plan is None or not plan.combined:
        source.expose_ungrouped(torch.as_tensor(poison, device=source.stats_device))


def check_token(opt: Balancer, plan: StepPlan, source: CaptureSource) -> None:
    """Refuses a plan whose gradients changed since ``clip_grad_norm_`` measured them."""
    if plan.token != _CHECKED and source.capture_token() != plan.token:
        opt._pending.plan = None
        raise CaptureError(
            "A backward pass added gradients after opt.clip_grad_norm_() measured the update, so the clip "
            "would be wrong. Clip after the last backward pass of the step, right before step()."
        )
    plan.token = _CHECKED


def check_plan(
    opt: Balancer, plan: StepPlan, source: CaptureSource, grad_scale: Tensor | None, found_inf: Tensor | None
) -> None:
    """The plan ``clip_grad_norm_`` made must fit the step being taken: same gradients, same scale."""
    check_token(opt, plan, source)
    measured = plan.verdict.scale
    scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale.item())
    if scale != measured:
        opt._pending.plan = None
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
    pending = opt._pending
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    losses = opt._backend.reduce_losses(torch.stack([pending.losses.get(n, nan).to(device) for n in names]))
    calls = tuple(pending.captures.get(n, 0) for n in names)
    full = GroupStats(names=names, gram=gram, losses=losses, backward_calls=calls, step=opt._step_count)
    dropped = [i for i, bad in enumerate(plan.verdict.nonfinite) if bad]
    if dropped:
        report_nonfinite(opt, [names[i] for i in dropped])
    keep = [i for i, bad in enumerate(plan.verdict.nonfinite) if not bad]
    warn_missing_losses(opt, [names[i] for i in keep])
    states = plan.states
    if not keep:  # every group is non-finite: nothing to weigh, the plugins are not asked
        weights = torch.zeros(0, dtype=torch.float64, device=device)
    else:
        weights, states = run_plugins(opt.plugins, states, full.select(keep) if dropped else full)
    full_weights = weights
    if dropped:
        index = torch.tensor(keep, dtype=torch.long, device=device)
        full_weights = torch.zeros(len(names), dtype=torch.float64, device=device).index_copy(0, index, weights)
        pending.dropped.update(names[i] for i in dropped)
        pending.source.drop(dropped)
    return full_weights, states, dataclasses.replace(full, weights=full_weights)
