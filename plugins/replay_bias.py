"""``replay_bias``: GSA's replay-bias adaptive weight at a logits tap.

Guo, Liu, Zhao, *Dealing with Cross-Task Class Discrimination in Online Continual Learning*
(GSA, CVPR 2023, arXiv 2305.14657). In class-incremental learning with replay, the classes of
the current task soak up probability mass while old classes, seen through a small memory, are
pushed down more than they are pulled up. GSA measures this per class from the softmax
cross-entropy gradient at the logits, ``p_i − onehot(y_i)``, accumulated over the stream:

* ``N_c`` rows of class c, ``P_c = Σ_{y_i=c} p_{i,c}``, ``Q_c = Σ_{y_i≠c} p_{i,c}``;
* ``ANT_c = (N_c − P_c) / Q_c``: the pull-up class c's logit received from its own rows
  divided by the push-down it received from other rows;
* each row's loss term is weighted by ``2·σ(ANT_{y_i} − 1)``, in ``[0.54, 2]``: a class whose
  own rows pull its logit up harder than other rows push it down (ANT > 1) gets up to 2x, one
  pushed down more than pulled up (ANT < 1) less than 1. Which classes those are depends on the
  objective. Each row's logit gradient sums to zero, so over all classes the pull-ups and the
  push-downs have the same total: ANT can only move mass between classes. In
  ``examples/online_continual.py`` (MNIST-1D, GSA's recipe) it stays near 1 and the mean weights
  within a few percent of 1 (docs/continual.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, cast

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import PluginOptions, TapEvent
from balancer.contract.plugin import InvalidStateError, TapPlugin

from ._named import check_nonnegative
from ._options import refuse_ignored

__all__ = ["ReplayBias", "ReplayBiasOptions", "ReplayBiasState", "ReplayBiasTapStats", "class_bias"]

_SUMS = ("count", "pos", "neg")


class ReplayBiasOptions(PluginOptions):
    """Options of :class:`ReplayBias`."""

    warmup: int = Field(5, ge=0, description="Steps at the start of each task with every weight 1 (GSA: 5).")
    groups: tuple[str, ...] | None = Field(
        None, description="Tap groups whose rows are reweighted; None: every tapped row (GSA's whole L_bal batch)."
    )
    count_groups: tuple[str, ...] | None = Field(
        None, description="Tap groups whose rows feed the per-class sums; None: every tapped row (GSA)."
    )
    scale: float = Field(2.0, gt=0.0, description="Weight = scale·sigmoid(ANT − centre); GSA: 2.")
    centre: float = Field(1.0, description="ANT at which the weight is scale/2; GSA: 1.")
    decay: float = Field(1.0, gt=0.0, le=1.0, description="Sums ← decay·sums + step; 1: whole-stream sums (GSA).")
    include_current: bool = Field(
        True, description="Weights include this step's own rows (GSA, rank-local under data parallel)."
    )
    task_start: Literal["manual", "new_class"] = Field(
        "manual",
        description="ReplayBias.start_task(opt) starts a task (GSA: known boundaries), or also a never-seen label.",
    )

    @model_validator(mode="after")
    def _nothing_ignored(self) -> ReplayBiasOptions:
        if self.count_groups == ():
            raise ValueError(
                "count_groups=() counts no row: ANT is never measured and every weight stays 1, so groups, scale "
                "and centre would be ignored. Use None (every tapped row, as GSA) or name the groups to count."
            )
        if self.warmup == 0:
            refuse_ignored(
                self,
                ["task_start"],
                "with warmup=0 (a task start only begins a warm-up)",
                "Set warmup > 0, or remove task_start.",
            )
        if self.groups == ():
            refuse_ignored(
                self,
                ["include_current"],
                "with groups=() (no row is reweighted; the metrics use the stored sums)",
                "Name the groups to reweight, or remove include_current.",
            )
        return self


def class_bias(
    count: Tensor, pos: Tensor, neg: Tensor, scale: float = 2.0, centre: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(ANT, weight)`` per class from the sums; never NaN/inf in the weights.

    ``ANT = (N − P)/Q``; with no push-down (``Q = 0``) it is ``inf`` (weight ``scale``), or 1 if
    there was no pull-up either. A class with no rows yet (``N = 0``) has ANT NaN and weight 1.
    """
    pull = (count - pos).clamp_min(0.0)
    ratio = pull / torch.where(neg > 0, neg, 1.0)
    ant = torch.where(neg > 0, ratio, torch.where(pull > 0, torch.inf, 1.0))
    weight = torch.where(count > 0, scale * torch.sigmoid(ant - centre), 1.0)
    return torch.where(count > 0, ant, torch.nan), weight


def _fit(t: Tensor, length: int, device: torch.device) -> Tensor:
    """``t`` on ``device``, cut or zero-padded to ``length`` entries."""
    t = t.to(device)
    if t.shape[0] >= length:
        return t[:length]
    return torch.cat([t, t.new_zeros(length - t.shape[0])])


class ReplayBiasTapStats(TypedDict):
    """One step's per-class sums (float64, as long as the widest tapped logits), summed over ranks."""

    count: Tensor  # N_c: rows of class c
    pos: Tensor  # P_c: Σ over rows of class c of p_{i,c}
    neg: Tensor  # Q_c: Σ over rows of other classes of p_{i,c}


class ReplayBiasState(ReplayBiasTapStats):
    """State of :class:`ReplayBias`: the sums of every step so far (decayed with ``decay < 1``)."""

    seen: Tensor  # 1.0 for a class counted at least once, else 0.0
    task_steps: Tensor  # 0-d long: steps since the current task started


class ReplayBias(TapPlugin[ReplayBiasState, ReplayBiasTapStats]):
    """GSA's replay-bias weight ``2·σ(ANT_y − 1)`` on logits rows (Guo, Liu, Zhao, CVPR 2023).

    Tap the logits of the batch the weighted loss is computed on, with integer class labels::

        opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-3), plugins=["replay_bias"])
        logits = model(x_bal).masked_fill(~seen, float("-inf"))      # unseen classes masked
        logits = opt.tap(logits, group=["replay"] * n_old + ["current"] * n_cur, labels=y_bal)
        loss = 2 * F.cross_entropy(logits, y_bal) + F.cross_entropy(model(x_new)[:, task_cols], y_new)
        loss.backward(); opt.step(); opt.zero_grad()

    **Where the statistics come from.** The gradient arriving at row i is ``s_i·(p_i − e_{y_i})``
    with ``s_i`` unknown to the plugin (the row's loss weight, 1/batch size, a loss scale, an
    earlier plugin's factor). A row fixes ``s_i(1 − p_{i,y})`` and the scale-free ratios
    ``p_{i,c}/(1 − p_{i,y})``, but not ``p_{i,y}`` itself, which the sums need (``P_c``, and
    ``Q_c`` adds unnormalised ``p_{i,c}`` across rows of different ``s_i``). So ``p_i`` is the softmax
    of the tapped logits (``event.value``, in float64) over all their columns: masked classes
    (logit ``-inf``) get ``p = 0``, as in a softmax cross-entropy over the seen classes. The
    gradient decides which rows count: a row that receives an all-zero gradient is in no loss
    and is skipped (a saturated row, ``p_y = 1``, adds nothing to ``N − P`` or ``Q`` anyway), and
    so is a row whose logits give no finite softmax (all ``-inf``, NaN).
    The plugin assumes the loss at these logits is softmax cross-entropy over the same columns;
    tap the sliced logits if the softmax runs over a slice. Rows whose label is outside
    ``[0, columns)`` (e.g. ``ignore_index=-100``) are neither counted nor reweighted. Logits
    must be ``[rows, classes]``: flatten sequence dimensions first. A row is counted once per
    backward pass through the tap.

    **Task starts** (``task_start``): GSA knows its task boundaries and gives weight 1 for the
    first ``warmup`` (5) batches of each task. By default (``"manual"``) the plugin does the same:
    call :meth:`start_task` on every rank before the forward pass of each task's first step (the
    first task's warm-up starts at ``init``); without these calls only the stream's first
    ``warmup`` steps are warm. Where boundaries are not announced, ``task_start="new_class"``
    also starts a task at a label never counted before: the warm-up then restarts at every
    class's first row, so a class whose first row comes a few batches into its task gives that
    task more than ``warmup`` warm steps (7 instead of 5 in one check). The step that brings the
    new class uses the detection on its local rows (under data parallel, a rank that has no
    new-class row in that step does not know yet); from the next step on every rank agrees.

    **Which rows are reweighted** (``groups``): by default every tapped row, as GSA weights its
    whole class-balanced batch ``L_bal`` (replay and current-task rows alike): the weight is a
    per-class correction, and the current task's classes, seen mostly in current-task rows, are
    half of it. ``groups=("replay",)`` weights only replay rows; ``groups=()`` measures ANT
    without reweighting (the w ≡ 1 ablation).

    **The weights of a row** come from the sums of the previous steps (summed over ranks), plus,
    with ``include_current`` (GSA updates its sums before taking the ratio), this step's rows
    tapped so far on this rank. Under gradient accumulation a later micro-batch thus sees the
    earlier ones; the state after the step does not depend on how the batch was split.
    Statistics are float64 per-class vectors as long as the widest tapped logits; they are summed
    over ranks and folded into the state at step time (``decay < 1`` gives exponentially
    weighted sums instead of GSA's whole-stream sums).
    """

    name = "replay_bias"
    Options = ReplayBiasOptions
    options: ReplayBiasOptions

    def init(self) -> ReplayBiasState:
        empty = torch.zeros(0, dtype=torch.float64)
        return ReplayBiasState(
            count=empty, pos=empty, neg=empty, seen=empty, task_steps=torch.zeros((), dtype=torch.long)
        )

    def check_state(self, state: ReplayBiasState) -> None:
        """Per-class sums of one length, not negative; ``seen`` flags 0 or 1; a step count not negative."""
        super().check_state(state)
        length = state["count"].shape[0]
        for key in (*_SUMS, "seen"):
            value = _get(state, key)
            if value.shape[0] != length:
                raise InvalidStateError(key, f"found {value.shape[0]} classes; `count` has {length}")
            check_nonnegative(value, key)
        if bool((state["seen"] > 1).any()):
            raise InvalidStateError("seen", f"found {state['seen'].tolist()}; expected flags 0 or 1 per class")
        check_nonnegative(state["task_steps"], "task_steps")

    def init_tap_stats(self) -> ReplayBiasTapStats:
        return _tap_stats({k: torch.zeros(0, dtype=torch.float64) for k in _SUMS})

    def tap(
        self, event: TapEvent, state: ReplayBiasState, tap_stats: ReplayBiasTapStats
    ) -> tuple[Tensor, ReplayBiasTapStats]:
        opts = self.options
        value, grad, labels = event.value, event.grad, event.labels
        if value.dim() != 2 or labels is None or labels.dim() != 1 or labels.is_floating_point():
            found = "no labels" if labels is None else f"labels {tuple(labels.shape)} {labels.dtype}"
            raise ValueError(
                f"replay_bias taps [rows, classes] logits with integer class labels [rows]: "
                f"opt.tap(logits, group=..., labels=y). Found logits {tuple(value.shape)} and {found}."
            )
        classes, device = value.shape[1], value.device
        labels = labels.to(device)
        probs = torch.softmax(value.to(torch.float64), dim=1)
        valid = (labels >= 0) & (labels < classes)
        label = torch.where(valid, labels, 0).long()
        counted = valid & _rows(event, opts.count_groups) & (grad != 0).any(dim=1) & probs.isfinite().all(dim=1)
        probs = torch.where(counted[:, None], probs, 0.0)  # a NaN row must not poison the sums
        own = torch.nn.functional.one_hot(label, classes).to(torch.float64)
        rows = counted.to(torch.float64)[:, None]
        batch = {
            "count": (own * rows).sum(0),
            "pos": (own * probs * rows).sum(0),
            "neg": ((1.0 - own) * probs * rows).sum(0),
        }
        length = max(classes, tap_stats["count"].shape[0])
        new_stats = _tap_stats(
            {k: _fit(_get(tap_stats, k), length, device) + _fit(batch[k], length, device) for k in _SUMS}
        )

        sums = {k: opts.decay * _fit(_get(state, k), classes, device) for k in _SUMS}
        if opts.include_current:
            sums = {k: sums[k] + _fit(_get(new_stats, k), classes, device) for k in _SUMS}
        _, weight = class_bias(sums["count"], sums["pos"], sums["neg"], opts.scale, opts.centre)
        warm = state["task_steps"].to(device) < opts.warmup
        if opts.task_start == "new_class" and opts.warmup > 0:
            unseen = _fit(state["seen"], classes, device) == 0
            warm = warm | ((_fit(new_stats["count"], classes, device) > 0) & unseen).any()
        weight = torch.where(warm, 1.0, weight)
        factor = torch.where(valid & _rows(event, opts.groups), weight[label], 1.0)
        return grad * factor.to(grad.dtype)[:, None], new_stats

    def merge_tap_stats(self, state: ReplayBiasState, tap_stats: ReplayBiasTapStats) -> ReplayBiasState:
        opts = self.options
        step_len, state_len = tap_stats["count"].shape[0], state["count"].shape[0]
        length = max(step_len, state_len)
        device = tap_stats["count"].device if step_len else state["count"].device
        step = {k: _fit(_get(tap_stats, k), length, device) for k in _SUMS}
        seen = _fit(state["seen"], length, device)
        fresh = (step["count"] > 0) & (seen == 0)
        task_steps = state["task_steps"].to(device) + 1
        if opts.task_start == "new_class":
            task_steps = torch.where(fresh.any(), torch.ones_like(task_steps), task_steps)
        sums = {k: opts.decay * _fit(_get(state, k), length, device) + step[k] for k in _SUMS}
        seen = torch.where(step["count"] > 0, 1.0, seen)
        return ReplayBiasState(count=sums["count"], pos=sums["pos"], neg=sums["neg"], seen=seen, task_steps=task_steps)

    def metrics(self, state: ReplayBiasState) -> dict[str, Any]:
        """``ant`` and ``weight`` per class (NaN / 1 for classes not seen), ``count``, ``task_steps``.

        ``weight`` is what the next step gives a class before its own rows are added (1 during
        the warm-up).
        """
        opts = self.options
        ant, weight = class_bias(state["count"], state["pos"], state["neg"], opts.scale, opts.centre)
        weight = torch.where(state["task_steps"].to(weight.device) < opts.warmup, torch.ones_like(weight), weight)
        return {"ant": ant, "weight": weight, "count": state["count"], "task_steps": state["task_steps"]}

    @classmethod
    def start_task(cls, opt: Any) -> None:
        """Starts a task now on the Balancer ``opt``: the next ``warmup`` steps use weight 1. Call
        on every rank, before the forward pass of the task's first step; the sums are kept."""
        names = [p.name for p in opt.plugins if isinstance(p, cls)]
        if not names:
            raise ValueError(f"start_task: this Balancer has no replay_bias plugin (plugins: {opt.plugins}).")
        for name in names:
            opt.update_plugin_state(name, lambda state: {**state, "task_steps": torch.zeros_like(state["task_steps"])})


def _get(sums: Mapping[str, Any], key: str) -> Tensor:
    """One of the per-class sums by name (the keys of ``_SUMS`` and ``seen``)."""
    return cast(Tensor, sums[key])


def _tap_stats(sums: Mapping[str, Tensor]) -> ReplayBiasTapStats:
    return ReplayBiasTapStats(count=sums["count"], pos=sums["pos"], neg=sums["neg"])


def _rows(event: TapEvent, groups: tuple[str, ...] | None) -> Tensor:
    if groups is None:
        return torch.ones(event.num_rows, dtype=torch.bool, device=event.group_index.device)
    return event.rows_of(*groups)
