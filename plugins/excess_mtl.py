"""``excess_mtl``: ExcessMTL, task weights driven by excess-risk estimates (He et al., ICML 2024)."""

from __future__ import annotations

import math
from typing import TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = ["ExcessMTL", "ExcessMTLOptions", "ExcessMTLState"]


class ExcessMTLOptions(PluginOptions):
    """Options of :class:`ExcessMTL`."""

    robust_step_size: float = Field(
        1.0, gt=0.0, description="Step size η_α of the exponentiated-gradient update of the weights (torchjd: 1)."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Steps of a group with unchanged weights whose mean excess risk becomes its baseline "
        "(paper App. C.1: 3 epochs); 0: the first step's excess risk is the baseline.",
    )  # fmt: skip


class ExcessMTLState(TypedDict):
    """State of :class:`ExcessMTL`: one entry per group seen, over ``names``."""

    names: list[str]  # every group seen so far, in order of first appearance
    log_weights: Tensor  # [m] log α, normalised over the groups of the last step each took part in
    sq_sum: Tensor  # [m] S_i = Σ_t ‖g_i(t)‖², the group's Adagrad accumulator
    risk_sum: Tensor  # [m] Σ of the excess risks measured during the group's warm-up
    baseline: Tensor  # [m] Ê_i⁰, the group's initial excess risk; NaN until measured
    steps: Tensor  # [m] how many steps the group took part in


class ExcessMTL(GramWeighting[ExcessMTLState]):
    """Weights groups up by how far they are from convergence, not by their loss (He et al. 2024).

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, *Robust Multi-Task Learning with Excess Risks*,
    ICML 2024. The excess risk of group ``i`` is estimated by a second-order Taylor expansion around
    the optimum, ``Ê_i = g_iᵀ H_i⁻¹ g_i`` (eqs. 6-7) with an Adagrad-like diagonal ``H_i`` built from
    the group's accumulated squared gradients; each estimate is divided by the group's initial one
    (scale processing, §3.2) and the weights ``α`` on the simplex take an exponentiated-gradient step::

        α_i ← α_i exp(η_α Ê_i / Ê_i⁰) / Σ_j α_j exp(η_α Ê_j / Ê_j⁰)      (eq. 9; d = Σ_i α_i g_i)

    Per-group preconditioner, not per coordinate: the paper's ``H_i = diag(sqrt(S_ij))`` with
    ``S_ij = Σ_t g_ij(t)²`` needs a ``k×n`` accumulator (``k`` more copies of the model) and a pass
    over it every step, which the Balancer does not keep: it sees the Gram matrix only. Here every
    coordinate's accumulator is replaced by the group's mean over the ``n`` coordinates,
    ``S_i / n`` with ``S_i = Σ_t ‖g_i(t)‖²`` (an AdaGrad-Norm step size), so::

        Ê_i = sqrt(n) ‖g_i‖² / sqrt(S_i)

    and the common factor ``sqrt(n)`` cancels in ``Ê_i / Ê_i⁰`` (it is dropped). What is lost: the
    per-coordinate curvature (a coordinate with a large history counts less than one with a small
    history); what is kept: the decrease of ``Ê`` as a group's gradients shrink relative to their
    history, for ``O(k)`` numbers of state and nothing beyond the Gram matrix. Both coincide when
    every coordinate of a group's gradient has the same magnitude at each step (``|g_ij(t)| = c_i(t)``).

    Other differences from torchjd 0.18's ``ExcessMTLWeighting`` (equal to it in that case with
    ``warmup_steps ≥ 1``, to its ``1e-7`` floors; tested): (1) without warm-up torchjd (like the
    official code) uses the raw ``Ê`` at the first step, in the gradients' units, whose factor
    ``exp(η_α Ê_i)`` stays in its weights forever (it can saturate them); here the first step is
    the baseline and its ratio is 1, so the weights start uniform and are torchjd's divided by that
    first factor (tested). (2) torchjd's absolute floors ``sqrt(S + 1e-7)`` and ``Ê⁰ + 1e-7`` are
    not used: a group with no gradient yet has ``Ê = 0``, and its baseline is taken at the first
    step after warm-up with ``Ê > 0`` (torchjd divides by ``1e-7`` and saturates instead).

    Warm-up (``warmup_steps``, counted per group): the group's weight is not updated and its mean
    ``Ê`` becomes its baseline (App. C.1). State is keyed by group name; a new group starts with
    ``α_i = 1/k`` and its own history, absent groups keep theirs, and the weights of the step's
    groups are renormalised together. With incoming weights ``w`` it weighs the gradients
    ``w_i g_i`` and returns ``w * α``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters()), plugins=[("excess_mtl", {"warmup_steps": 300})])
    """

    name = "excess_mtl"
    Options = ExcessMTLOptions
    options: ExcessMTLOptions
    nonfinite_state = {"baseline": "nan"}  # NaN: no initial excess risk measured yet for that group

    def init(self) -> ExcessMTLState:
        empty = torch.zeros(0, dtype=torch.float64)
        return ExcessMTLState(
            names=[], log_weights=empty, sq_sum=empty.clone(), risk_sum=empty.clone(), baseline=empty.clone(),
            steps=empty.clone(),
        )  # fmt: skip

    def check_state(self, state: ExcessMTLState) -> None:
        """One entry per stored name; accumulators, baselines and step counts are not negative."""
        super().check_state(state)
        check_named_state(state, vectors=("log_weights", "sq_sum", "risk_sum", "baseline", "steps"))
        for key in ("sq_sum", "risk_sum", "baseline", "steps"):
            check_nonnegative(state[key], key)

    def weigh(self, stats: GroupStats, state: ExcessMTLState) -> tuple[Tensor, ExcessMTLState]:
        opts = self.options
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        k = stats.num_groups
        full = {
            "log_weights": named.vector(state["log_weights"], -math.log(k), device),
            "baseline": named.vector(state["baseline"], float("nan"), device),
            **{key: named.vector(state[key], 0.0, device) for key in ("sq_sum", "risk_sum", "steps")},
        }
        now = {key: named.take(value) for key, value in full.items()}

        sq = stats.sq_norms
        sq_sum = now["sq_sum"] + sq
        risk = torch.where(sq_sum > 0, sq / torch.where(sq_sum > 0, sq_sum, 1.0).sqrt(), 0.0)
        warming = now["steps"] < opts.warmup_steps
        risk_sum = now["risk_sum"] + torch.where(warming, risk, 0.0)
        warm_mean = risk_sum / max(opts.warmup_steps, 1)
        candidate = torch.where(warm_mean > 0, warm_mean, risk)
        baseline = now["baseline"]
        baseline = torch.where(~warming & torch.isnan(baseline) & (candidate > 0), candidate, baseline)
        known = ~warming & torch.isfinite(baseline)
        ratio = torch.where(known, risk / torch.where(known, baseline, 1.0), 0.0)

        logits = now["log_weights"] + opts.robust_step_size * ratio
        log_weights = torch.log_softmax(logits, dim=0)
        new = {
            "log_weights": log_weights,
            "sq_sum": sq_sum,
            "risk_sum": risk_sum,
            "baseline": baseline,
            "steps": now["steps"] + 1.0,
        }
        stored = {key: named.put(full[key], value) for key, value in new.items()}
        return log_weights.exp(), ExcessMTLState(names=named.names, **stored)  # type: ignore[typeddict-item]

    def metrics(self, state: ExcessMTLState) -> dict[str, object]:
        """The weights ``α`` of every group seen (each as of the last step it took part in), by name."""
        return {f"alpha/{name}": state["log_weights"][i].exp() for i, name in enumerate(state["names"])}
