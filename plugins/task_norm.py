"""``task_norm``: equal per-task gradient norms (Wu et al., multi-task RL post-training).

Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task LLMs* (arXiv 2510.19178,
Findings of EACL 2026) measure per-task squared gradient norms that differ by up to 33x without
matching learning gains, and call for gradient-level corrections. This plugin is the direct one:
rescale each task so that its contribution to the update has the same norm.

The norm of a mini-batch gradient is biased upward by the batch noise, ``E‖ĝ_k‖² = ‖E g_k‖² +
tr Cov ĝ_k``, so with the naive norms a noisy task looks larger than it is. With
``estimate="split_half"`` and each task captured as two independent halves ``"x/A"``, ``"x/B"``
(:mod:`balancer.recipes.split_half`), the task's norm is the unbiased estimate instead.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import GroupStats, PluginError, PluginOptions
from balancer.contract.weighting import GramWeighting
from balancer.recipes.split_half import task_layout

from ._named import ByName, check_nonnegative, check_scalars_by_name, gather_by_name, scatter_by_name
from ._options import refuse_ignored

__all__ = ["TaskNorm", "TaskNormOptions", "TaskNormState"]


class TaskNormState(TypedDict):
    """State of :class:`TaskNorm`."""

    ema_norms: ByName  # EMA of each group's contribution norm (with beta > 0), by group name
    ema_target: Tensor  # 0-d: EMA of the target (target="ema"); NaN before the first step
    updates: int  # update() calls so far


class TaskNormOptions(PluginOptions):
    """Options of :class:`TaskNorm`."""

    target: Literal["mean", "max", "min", "ema"] = Field(
        "mean", description="Norm every group is brought to: mean/max/min over groups, or an EMA of the mean."
    )
    alpha: float = Field(
        1.0, ge=0.0, le=1.0, description="1 = full equalization, 0.5 = half-way; 0 (no change) is refused."
    )
    beta: float = Field(0.0, ge=0.0, lt=1.0, description="EMA factor of per-group norms; 0 uses this step's norms.")
    target_beta: float = Field(0.9, ge=0.0, lt=1.0, description="EMA factor of the target when target='ema'.")
    eps: float = Field(1e-8, gt=0.0, lt=1.0, description="Norms below eps·target count as eps·target (caps weights).")
    max_weight: float | None = Field(
        None, gt=0.0, description="Upper bound on the factor task_norm applies to a group (None: only eps bounds it)."
    )
    estimate: Literal["naive", "split_half"] = Field(
        "naive",
        description="Norm of a group: its gradient's ('naive'), or for tasks captured as halves 'x/A', 'x/B' the "
        "unbiased split-half estimate sqrt(max(4<g_A, g_B>, 0)) of the task's ‖E g‖ ('split_half').",
    )

    @model_validator(mode="after")
    def _nothing_ignored(self) -> TaskNormOptions:
        if self.alpha == 0.0:
            raise ValueError(
                "alpha=0 makes every factor (T/‖g_k‖)^0 = 1: task_norm would change no weight, and target, beta "
                "and the other options would be ignored. Use alpha > 0 (1: equal norms, 0.5: half-way), or remove "
                "the plugin for the unbalanced baseline (opt.last_stats.norms still shows the norms)."
            )
        if self.target != "ema":
            refuse_ignored(
                self,
                ["target_beta"],
                f"with target={self.target!r} (it is the EMA factor of target='ema')",
                "Set target='ema', or remove target_beta.",
            )
        return self


class TaskNorm(GramWeighting[TaskNormState]):
    """Equalizes per-group gradient norms: w_k = (target / ‖g_k‖)^alpha (Wu et al. 2025).

    With incoming weights ``v`` (ones when it is the first plugin), the norm of group k's
    contribution is ``c_k = |v_k|·‖g_k‖`` (or its EMA over steps, ``ĉ_k ← β ĉ_k + (1-β) c_k``,
    when ``beta > 0``). With ``T`` the mean, max or min of the positive ``ĉ_k`` (or an EMA over
    steps of their mean, ``target="ema"``)::

        w_k = v_k · (T / max(ĉ_k, eps·T))^alpha        if ĉ_k > 0
        w_k = 0                                        if ĉ_k = 0   (a zero gradient, never NaN)

    With ``alpha = 1`` and ``beta = 0`` every group's contribution ``‖w_k g_k‖`` equals ``T``.

    ``estimate="split_half"``: every group must be a half ``"x/A"`` or ``"x/B"`` of a task ``x``
    whose other half is in the step (a group without its partner raises :class:`PluginError`).
    The unit is then the task: ``c_x = sqrt(max(4⟨v_A g_A, v_B g_B⟩, 0))``, unbiased in square
    for ``‖E(v g_x)‖²`` when the halves are independent and weighted alike (``v_A = v_B``, as when
    ``task_norm`` comes first); the EMA is kept per task; both halves get the task's factor. A
    task whose estimate is ``≤ 0`` (its halves disagree: no mean gradient measurable) counts
    as a zero gradient and gets weight 0 in that step.
    ``max_weight`` caps the factor ``w_k / v_k``, so a group whose gradient has all but vanished
    (a solved task) is not blown up to ``1/eps``.

    Example::

        opt = Balancer(torch.optim.AdamW(model.parameters()), plugins=[("task_norm", {"alpha": 0.5})])
    """

    name = "task_norm"
    Options = TaskNormOptions
    options: TaskNormOptions
    nonfinite_state = {"ema_target": "nan"}  # NaN: no target yet (the EMA starts at the next mean)

    def init(self) -> TaskNormState:
        return TaskNormState(ema_norms={}, ema_target=torch.tensor(float("nan"), dtype=torch.float64), updates=0)

    def check_state(self, state: TaskNormState) -> None:
        """EMA norms: a 0-d tensor per group name, finite and not negative (a NaN norm would give
        its group weight 0 at every later step); a target and an update count not negative."""
        super().check_state(state)
        check_scalars_by_name(state["ema_norms"], "ema_norms")
        check_nonnegative(state["ema_target"], "ema_target")
        check_nonnegative(state["updates"], "updates")

    def weigh(self, stats: GroupStats, state: TaskNormState) -> tuple[Tensor, TaskNormState]:
        opts = self.options
        contrib = stats.norms  # of the weighted gradients: |v_k|·‖g_k‖
        names: tuple[str, ...] = stats.names
        members: list[tuple[int, ...]] = [(i,) for i in range(stats.num_groups)]
        if opts.estimate == "split_half":
            names, members = _split_half_tasks(stats.names)
            cross = torch.stack([stats.gram[rows[0], rows[1]] for rows in members])
            contrib = (4.0 * cross).clamp_min(0.0).sqrt()
        ema_norms = dict(state["ema_norms"])
        if opts.beta > 0.0:
            contrib = opts.beta * gather_by_name(ema_norms, names, contrib) + (1.0 - opts.beta) * contrib
            ema_norms = scatter_by_name(ema_norms, names, contrib)
        positive = contrib > 0
        count = positive.sum()
        mean = torch.where(positive, contrib, 0.0).sum() / count.clamp_min(1)
        ema_target = state["ema_target"].to(contrib)
        if opts.target == "mean":
            target = mean
        elif opts.target == "max":
            target = torch.where(positive, contrib, 0.0).max()
        elif opts.target == "min":
            target = torch.where(positive, contrib, torch.inf).min()
            target = torch.where(count > 0, target, 0.0)
        else:
            blended = opts.target_beta * ema_target + (1.0 - opts.target_beta) * mean
            target = torch.where(torch.isnan(ema_target), mean, blended)
            ema_target = torch.where(count > 0, target, ema_target)
        denom = torch.maximum(contrib, opts.eps * target)
        safe = torch.where(positive, denom, 1.0)
        factor = torch.where(positive, (target / safe) ** opts.alpha, 0.0)
        if opts.max_weight is not None:
            factor = factor.clamp(max=opts.max_weight)
        if opts.estimate == "split_half":
            group_task = [0] * stats.num_groups
            for t, rows in enumerate(members):
                for i in rows:
                    group_task[i] = t
            factor = factor[group_task]
        return factor, TaskNormState(ema_norms=ema_norms, ema_target=ema_target, updates=state["updates"] + 1)


def _split_half_tasks(names: tuple[str, ...]) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """The tasks of ``names`` and the rows of their halves ``(A, B)``; every group must be a half."""
    tasks, rows = task_layout(names)
    unpaired = [names[r[0]] for r in rows if len(r) != 2]
    if unpaired:
        raise PluginError(
            f"task_norm with estimate='split_half' needs every group captured as two halves 'x/A' and 'x/B' "
            f"(balancer.recipes.split_half.half_groups); found groups without their other half: {unpaired}. "
            "Capture each task as two halves, or use estimate='naive'."
        )
    return tasks, rows
