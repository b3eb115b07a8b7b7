"""``balanced_dpo``: chosen/rejected gradient balancing for DPO (after Ma et al., Balanced-DPO).

Ma et al., *Gradient Imbalance in Direct Preference Optimization* (arXiv 2502.20847, 2025),
find that DPO's gradient is imbalanced between the chosen and the rejected response and
propose a gradient reweighting ("Balanced-DPO"). **Their exact formula could not be
obtained**; this plugin implements two well-defined rules derived from the DPO gradient and
does not claim either is the paper's.

With ``u = β (s_w − s_l)`` (see :mod:`balancer.recipes.dpo`), the DPO gradient is
``−β σ(−u) (∇log π_w − ∇log π_l)``: balanced in log-probability space, but

* in **parameter space** the two groups ``G_w = −c ∇log π_w`` and ``G_l = +c ∇log π_l`` have
  norms ``c‖∇log π_w‖`` and ``c‖∇log π_l‖``, which differ (low-probability responses have the
  larger per-token gradients, ``∝ 1 − p_t``);
* in **probability space** ``|∂L/∂π_l| / |∂L/∂π_w| = π_w / π_l`` (Feng et al., *Towards
  Analyzing and Understanding the Limitations of DPO*, arXiv 2404.04626): once the model
  prefers ``y_w``, the push-down on ``y_l`` dominates, ``log π_l`` collapses and ``log π_w``
  can fall with it.

Rules (``rule=``):

``"norm"`` (parameter space, grouped-gradient path). Capture the groups with
``opt.backward(dpo_group_losses(...))``. The chosen and rejected contributions are brought to
their mean norm, partially with exponent ``alpha`` and optionally on EMA norms (``beta``):
``w_g = (m / ‖G_g‖)^alpha``, ``m = (‖G_w‖ + ‖G_l‖)/2``; this is :class:`task_norm
<balancer.plugins.TaskNorm>` restricted to the two groups (other groups keep their weights).

``"prob"`` (probability space, at the log-prob taps). Tap both sides with
:func:`balancer.recipes.dpo.tap_pairs`. Per pair, the chosen-side gradient is multiplied by
``f = min(C, π_w/π_l)`` (``side="chosen"``, the default), which makes ``|∂L/∂π_w| = |∂L/∂π_l|``
up to the clip ``C`` (default 2, the clip AdaDPO summaries report), or the rejected side by
``clamp(π_l/π_w, 1/C, C)`` (``side="rejected"``: the same chosen/rejected balance by damping
the push-down instead of amplifying the pull-up, so steps get smaller, never larger than C×).
This is a gradient reweighting with the ratio detached; AdaDPO's loss form
``−log σ(β f s_w − β s_l)`` also changes ``σ(−u)`` and is *not* what this rule does.
Zero-probability pairs: ``π_l = 0 < π_w`` gives the chosen factor ``C`` (rejected ``1/C``);
``π_w = 0 < π_l`` gives chosen ``floor`` (rejected ``C``); ``π_w = π_l = 0`` gives ``1``.

``floor`` (default 0, the formula as stated) bounds the chosen factor from below. Without it,
a pair the model ranks the wrong way (``π_w ≪ π_l``, common with summed log-probs of long
sequences, which differ by tens of nats) loses its chosen pull-up entirely, exactly where it is
needed; the autoregressive setting of ``examples/experiments/dpo_imbalance.py`` shows runs
destabilised by it. ``floor = 1/C`` or token-mean log-probs
(``sequence_logprobs(..., reduction="mean")``, as AdaDPO reportedly uses) avoid that.
With ``"prob"`` the gradient is rescaled inside the backward pass, so ``last_stats.norms`` (and
the ``chosen_norm``/``rejected_norm`` metrics) are those of the rescaled groups.

Both rules record, per step, the mean tapped chosen and rejected log-probabilities (rows that
received a gradient) and, for ``"prob"``, the mean factor; :meth:`BalancedDPO.metrics` gives
them with the chosen/rejected gradient norms, their ratio and the weights.

Example::

    opt = Balancer(torch.optim.AdamW(model.parameters()), plugins=[("balanced_dpo", {"rule": "prob"})])
    logp_w, logp_l = tap_pairs(opt, logp_w, logp_l)
    opt.backward(dpo_group_losses(logp_w, logp_l, ref_w, ref_l, beta=0.1))
    opt.step()
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypedDict

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import GroupStats, PluginOptions, TapEvent
from balancer.contract.plugin import InvalidStateError, TapPlugin

from ._options import refuse_ignored
from .task_norm import TaskNorm, TaskNormState

__all__ = ["BalancedDPO", "BalancedDPOOptions", "BalancedDPOState", "BalancedDPOTapStats"]

_NAN = float("nan")
# Tap statistics, one float64 vector: sum and count of chosen log-probs, of rejected
# log-probs, and of the prob rule's per-pair factors.
_SUM_W, _N_W, _SUM_L, _N_L, _SUM_F, _N_F = range(6)


class BalancedDPOOptions(PluginOptions):
    """Options of :class:`BalancedDPO`."""

    rule: Literal["norm", "prob"] = Field("norm", description="Parameter-space norm balance, or probability-space.")
    chosen: str = Field("chosen", min_length=1, description="Group name of the chosen side.")
    rejected: str = Field("rejected", min_length=1, description="Group name of the rejected side.")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="norm rule: 1 = equal norms, 0 = no change.")
    beta: float = Field(0.0, ge=0.0, lt=1.0, description="norm rule: EMA factor of the two norms (0: this step's).")
    clip: float = Field(2.0, gt=0.0, description="prob rule: C in min(C, π_w/π_l).")
    side: Literal["chosen", "rejected"] = Field("chosen", description="prob rule: the side that is rescaled.")
    floor: float = Field(0.0, ge=0.0, le=1.0, description="prob rule, side chosen: lower bound of the factor.")

    @model_validator(mode="after")
    def _nothing_ignored(self) -> BalancedDPOOptions:
        if self.chosen == self.rejected:
            raise ValueError(
                f"chosen and rejected are both {self.chosen!r}: the two sides must be different groups. "
                "Name the chosen and the rejected group as captured (see balancer.recipes.dpo.dpo_group_losses)."
            )
        if self.rule == "norm":
            refuse_ignored(
                self,
                ["clip", "side", "floor"],
                "with rule='norm' (they belong to rule='prob')",
                "Set rule='prob' to rescale at the log-prob taps, or remove them.",
            )
            if self.alpha == 0.0:
                raise ValueError(
                    "alpha=0 with rule='norm' changes no weight (and beta would be ignored). Use alpha > 0, or remove "
                    "the plugin and read the chosen/rejected norms from opt.last_stats.norms."
                )
        else:
            refuse_ignored(
                self,
                ["alpha", "beta"],
                "with rule='prob' (they belong to rule='norm')",
                "Set rule='norm' to balance the parameter-gradient norms, or remove them.",
            )
            if self.side == "rejected":
                refuse_ignored(
                    self,
                    ["floor"],
                    "with side='rejected' (it bounds the chosen side's factor)",
                    "Set side='chosen', or remove floor (the rejected factor already lies in [1/clip, clip]).",
                )
                if self.clip <= 1.0:
                    raise ValueError(
                        f"clip={self.clip} with side='rejected' leaves no room: the factor is clamped to [1/clip, "
                        "clip], which is the single value 1 (clip=1) or empty (clip<1). Use clip > 1 (default 2)."
                    )
        return self


class BalancedDPOState(TypedDict):
    """State of :class:`BalancedDPO`; the ``[2]`` vectors are [chosen, rejected], NaN where unknown."""

    task_norm: TaskNormState  # the norm rule's equalisation
    norms: Tensor  # [2] this step's contribution norms (before the rule)
    weights: Tensor  # [2] the weights the rule gave them
    logp: Tensor  # [2] this step's mean tapped log-probs
    prev_logp: Tensor  # [2] the previous step's
    factor: Tensor  # 0-d: prob rule, mean factor on the rescaled side


class BalancedDPOTapStats(TypedDict):
    """One step's tap sums: ``sums[_SUM_W .. _N_F]``, summed over ranks at step time."""

    sums: Tensor  # [6] float64


class BalancedDPO(TapPlugin[BalancedDPOState, BalancedDPOTapStats]):
    """Balances DPO's chosen and rejected gradients (rules "norm" and "prob"; see the module docs)."""

    name = "balanced_dpo"
    Options = BalancedDPOOptions
    options: BalancedDPOOptions
    # NaN: not measured yet (or a side absent from the step); logged values may be -inf (π = 0).
    nonfinite_state = {
        "task_norm.ema_target": "nan",
        "norms": "nan",
        "weights": "nan",
        "factor": "nan",
        "logp": "any",
        "prev_logp": "any",
    }

    def __init__(self, options: Any = None, /, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._norm = TaskNorm(target="mean", alpha=self.options.alpha, beta=self.options.beta)

    def init(self) -> BalancedDPOState:
        nan2 = torch.full((2,), _NAN, dtype=torch.float64)
        return BalancedDPOState(
            task_norm=self._norm.init(),
            norms=nan2.clone(),
            weights=nan2.clone(),
            logp=nan2.clone(),
            prev_logp=nan2.clone(),
            factor=torch.tensor(_NAN, dtype=torch.float64),
        )

    def check_state(self, state: BalancedDPOState) -> None:
        """The structure of :meth:`init`, and the norm rule's state as :class:`TaskNorm` checks it."""
        super().check_state(state)
        try:
            self._norm.check_state(state["task_norm"])
        except InvalidStateError as exc:
            raise InvalidStateError(f"task_norm.{exc.path}", exc.problem) from None

    @property
    def acts_on_groups(self) -> bool:
        return self.options.rule == "norm"

    @property
    def needs_taps(self) -> bool:  # the norm rule only logs log-probs at taps, if there are any
        return self.options.rule == "prob"

    # -- norm rule: the grouped-gradient path ------------------------------------------------
    def update(self, stats: GroupStats, weights: Tensor, state: BalancedDPOState) -> tuple[Tensor, BalancedDPOState]:
        names = (self.options.chosen, self.options.rejected)
        present = [i for i, g in enumerate(names) if g in stats.names]
        if not present:
            return weights, state
        rows = [stats.names.index(names[i]) for i in present]

        def per_side(values: Tensor) -> Tensor:  # [chosen, rejected], nan for an absent side
            out = torch.full((2,), _NAN, dtype=torch.float64, device=weights.device)
            out[present] = values
            return out

        new_state = BalancedDPOState(**state)
        new_state["norms"] = per_side((weights.abs() * stats.norms)[rows])
        new_weights = weights
        if self.options.rule == "norm":
            side_weights, new_state["task_norm"] = self._norm.update(
                stats.select(rows), weights[rows], state["task_norm"]
            )
            new_weights = weights.index_copy(0, torch.tensor(rows, device=weights.device), side_weights)
        new_state["weights"] = per_side(new_weights[rows])
        return new_weights, new_state

    # -- prob rule: the log-prob taps ------------------------------------------------------
    def init_tap_stats(self) -> BalancedDPOTapStats:
        return BalancedDPOTapStats(sums=torch.zeros(6, dtype=torch.float64))

    def tap(
        self, event: TapEvent, state: BalancedDPOState, tap_stats: BalancedDPOTapStats
    ) -> tuple[Tensor, BalancedDPOTapStats]:
        opts = self.options
        value = event.value.detach().to(torch.float64)
        if value.dim() != 1:
            raise ValueError(f"balanced_dpo taps sequence log-probs of shape [rows]. Found {tuple(value.shape)}.")
        is_w, is_l = event.rows_of(opts.chosen), event.rows_of(opts.rejected)
        reached = event.grad.detach() != 0  # rows of this backward pass (a split backward reaches one side)
        grad = event.grad
        sums = tap_stats["sums"].to(value.device)
        add = torch.zeros(6, dtype=torch.float64, device=value.device)
        for mask, s, n in ((is_w & reached, _SUM_W, _N_W), (is_l & reached, _SUM_L, _N_L)):
            add[s] = torch.where(mask, value, 0.0).sum()
            add[n] = mask.sum()
        if opts.rule == "prob":
            if event.labels is None:
                raise ValueError(
                    "balanced_dpo rule='prob' pairs rows by labels: tap with balancer.recipes.dpo.tap_pairs."
                )
            factor, paired = self._pair_factors(value, is_w, is_l, event.labels.long())
            scaled = is_w if opts.side == "chosen" else is_l
            row_factor = torch.where(scaled & reached, factor[event.labels.long()], 1.0)
            grad = grad * row_factor.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
            add[_SUM_F] = torch.where(paired, factor, 0.0).sum()
            add[_N_F] = paired.sum()
        return grad, BalancedDPOTapStats(sums=sums + add)

    def _pair_factors(self, value: Tensor, is_w: Tensor, is_l: Tensor, pair: Tensor) -> tuple[Tensor, Tensor]:
        """Per pair id: the factor on the rescaled side, and whether the pair has both sides."""
        rows = value.shape[0]
        zeros = torch.zeros(rows, dtype=torch.float64, device=value.device)

        def side_mean(mask: Tensor) -> tuple[Tensor, Tensor]:
            total = zeros.scatter_add(0, pair, torch.where(mask, value, 0.0))
            count = zeros.scatter_add(0, pair, mask.to(torch.float64))
            return total / count.clamp_min(1.0), count > 0

        logp_w, has_w = side_mean(is_w)
        logp_l, has_l = side_mean(is_l)
        diff = logp_w - logp_l  # log(π_w/π_l); +inf when π_l = 0, nan when both are 0
        log_clip = math.log(self.options.clip)
        if self.options.side == "chosen":
            factor = torch.exp(diff.clamp(max=log_clip)).clamp_min(self.options.floor)
        else:
            factor = torch.exp((-diff).clamp(min=-log_clip, max=log_clip))
        paired = has_w & has_l
        return torch.where(paired & ~torch.isnan(diff), factor, 1.0), paired & ~torch.isnan(diff)

    def merge_tap_stats(self, state: BalancedDPOState, tap_stats: BalancedDPOTapStats) -> BalancedDPOState:
        sums = tap_stats["sums"].to(state["logp"].device)
        means = torch.stack([sums[_SUM_W] / sums[_N_W], sums[_SUM_L] / sums[_N_L]])
        seen = torch.stack([sums[_N_W], sums[_N_L]]) > 0
        new_state = BalancedDPOState(**state)
        new_state["prev_logp"] = torch.where(seen, state["logp"], state["prev_logp"])
        new_state["logp"] = torch.where(seen, means, state["logp"])
        new_state["factor"] = torch.where(sums[_N_F] > 0, sums[_SUM_F] / sums[_N_F].clamp_min(1.0), _NAN)
        return new_state

    def metrics(self, state: BalancedDPOState) -> dict[str, Any]:
        norms, logp = state["norms"], state["logp"]
        return {
            "chosen_norm": norms[0],
            "rejected_norm": norms[1],
            "rejected_over_chosen_norm": norms[1] / norms[0],
            "chosen_weight": state["weights"][0],
            "rejected_weight": state["weights"][1],
            "logp_chosen": logp[0],
            "logp_rejected": logp[1],
            "logp_chosen_change": logp[0] - state["prev_logp"][0],
            "logp_rejected_change": logp[1] - state["prev_logp"][1],
            "prob_factor": state["factor"],
        }
