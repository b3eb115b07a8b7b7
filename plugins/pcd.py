"""``pcd``: Priority-Constrained Descent (TMLR 2026): follow a primary group, guarantee the others progress."""

from __future__ import annotations

from typing import TypedDict

import torch
from pydantic import Field, model_validator
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.plugin import InvalidStateError
from balancer.contract.weighting import GramWeighting
from balancer.errors import PluginError

from ._named import ByName, check_nonnegative, check_scalars_by_name, gather_by_name, scatter_by_name
from ._qp import solve_nonneg_qp

__all__ = ["PCD", "PCDOptions", "PCDState"]

_INFEASIBLE = 1e-6  # a constraint violated by more than this fraction of max_j τ_j ‖g̃_j‖² after solving: infeasible
_FLOOR = 1e-11  # ... or by more than this fraction of the largest ‖g̃_i‖² (rounding of the solve)
_PRECISION = 10.0 * torch.finfo(torch.float64).eps  # ‖d̃‖² below this times its rounding scale counts as 0


class PCDState(TypedDict):
    """State of :class:`PCD`."""

    sq_norm_ema: ByName  # group name -> EMA of its squared gradient norm (not yet bias-corrected)
    updates: dict[str, int]  # group name -> steps that group took part in (for the bias correction)


class PCDOptions(PluginOptions):
    """Options of :class:`PCD`."""

    primary: str = Field(min_length=1, description="Name of the primary group, whose gradient the update follows.")
    tau: float = Field(0.02, ge=0.0, le=1.0, description="Fraction τ of normalised first-order progress guaranteed "
                       "to every secondary group (torchjd's default 0.02).")  # fmt: skip
    group_tau: dict[str, float] = Field(
        default_factory=dict, description="τ for named secondary groups (each in [0, 1]); others use tau."
    )
    beta: float = Field(0.999, ge=0.0, lt=1.0, description="Decay of the EMA of the squared gradient norms.")
    eps: float = Field(1e-8, ge=0.0, description="Added to the bias-corrected EMA before its inverse square root.")

    @model_validator(mode="after")
    def _check_group_tau(self) -> PCDOptions:
        bad = {n: t for n, t in self.group_tau.items() if not 0.0 <= t <= 1.0}
        if bad:
            raise ValueError(f"group_tau values must be in [0, 1]; found {bad}.")
        if self.primary in self.group_tau:
            raise ValueError(
                f"group_tau names the primary group {self.primary!r}, which has no constraint (τ is for the "
                "secondary groups). Remove it from group_tau."
            )
        return self


class PCD(GramWeighting[PCDState]):
    """Follows the primary group's gradient, constrained so every other group keeps a share τ of progress.

    Varam, AlHajri, *Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization*, TMLR 2026 (arXiv 2606.29521), as implemented by torchjd 0.18's
    ``PCD``. With ``g_1`` the gradient of the group named ``primary`` and ``g_j`` the others, each
    gradient is normalised by the EMA of its squared norm, ``g̃_i = s_i g_i`` with
    ``s_i = 1 / √(v̂_i + ε)``, ``v_i ← β v_i + (1 - β) ‖g_i‖²`` and ``v̂_i = v_i / (1 - β^n_i)``
    (``n_i`` the steps group i took part in), and the direction solves::

        d̃ = argmin_d ½ ‖d - g̃_1‖²   subject to   g̃_jᵀ d ≥ τ_j ‖g̃_j‖²   for every secondary j

    The update is ``d̃`` rescaled to the norm of ``g_1``. By the KKT conditions
    ``d̃ = g̃_1 + Σ_j μ_j g̃_j`` where ``μ ≥ 0`` minimises the dual ``½ μᵀ G̃_ss μ - bᵀ μ`` with
    ``b_j = τ_j G̃_jj - G̃_j1`` (``G̃`` the normalised Gram matrix): a nonnegative QP on the Gram
    matrix, solved by the shared solver (:func:`~balancer.plugins._qp.solve_nonneg_qp`, exact
    active-set enumeration up to 9 groups, interior point above; torchjd runs Goldfarb-Idnani's
    dual active-set method on the host). The weights are ``s_1 c`` for the primary and ``s_j μ_j c``
    for the others, ``c = ‖g_1‖ / ‖d̃‖``.

    As in torchjd: a zero primary gradient, or ``d̃ = 0`` up to rounding, gives all-zero weights;
    constraints that cannot hold together (the dual is unbounded: after the solve a constraint is
    still violated by more than 1e-6 of ``max_j τ_j ‖g̃_j‖²``, e.g. two opposite secondary
    gradients) are dropped and the update is ``g_1`` itself; a non-finite Gram matrix gives NaN
    weights, so the Balancer refuses the step and keeps the previous state (torchjd returns NaN
    and leaves its EMA as it was). Where it differs, because groups are named: the primary is a
    name, not the first row (a step without it raises :class:`~balancer.errors.PluginError`), and
    the EMA and its step count are kept per group name (a group absent from a step keeps its
    entries, a new one starts from zero) where torchjd keeps one EMA that restarts whenever the
    number of rows changes; while the groups stay the same the numbers are torchjd's. With
    incoming weights ``w`` it weighs the gradients ``w_i g_i`` and returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters()), plugins=[("pcd", {"primary": "math", "tau": 0.05})])
        ...
        opt.step()
    """

    name = "pcd"
    Options = PCDOptions
    options: PCDOptions

    def init(self) -> PCDState:
        return PCDState(sq_norm_ema={}, updates={})

    def check_state(self, state: PCDState) -> None:
        """The structure, an EMA that is not negative, and a nonnegative step count for every name with an EMA."""
        super().check_state(state)
        check_scalars_by_name(state["sq_norm_ema"], "sq_norm_ema")
        for name, count in state["updates"].items():
            if not isinstance(name, str) or type(count) is not int:
                raise InvalidStateError(f"updates.{name}", f"found {count!r}; expected a group name mapped to an int")
            check_nonnegative(count, f"updates.{name}")
        if set(state["updates"]) != set(state["sq_norm_ema"]):
            raise InvalidStateError("updates", "expected the same group names as sq_norm_ema")

    def _scales(self, stats: GroupStats, state: PCDState) -> tuple[Tensor, Tensor, dict[str, int]]:
        """``s_i = 1/√(v̂_i + ε)`` (0 where that is infinite), the updated EMA and the updated counts."""
        gram, names, beta = stats.gram, stats.names, self.options.beta
        zeros = torch.zeros(len(names), dtype=gram.dtype, device=gram.device)
        ema = beta * gather_by_name(state["sq_norm_ema"], names, zeros) + (1.0 - beta) * gram.diagonal()
        counts = {n: state["updates"].get(n, 0) + 1 for n in names}
        correction = torch.tensor([1.0 - beta ** counts[n] for n in names], dtype=gram.dtype).to(gram.device)
        root = (ema / correction + self.options.eps).sqrt()
        scales = torch.where(root > 0, 1.0 / root.clamp_min(1e-300), 0.0)
        return scales, ema, {**state["updates"], **counts}

    def weigh(self, stats: GroupStats, state: PCDState) -> tuple[Tensor, PCDState]:
        names, gram = list(stats.names), stats.gram
        if self.options.primary not in names:
            raise PluginError(
                f"pcd's primary group {self.options.primary!r} is not among this step's groups {names}. Capture it "
                "in every step, or set `primary` to the name of a group that is always captured."
            )
        p = names.index(self.options.primary)
        scales, ema, counts = self._scales(stats, state)
        normalised = gram * torch.outer(scales, scales)
        w = torch.zeros(len(names), dtype=gram.dtype, device=gram.device)
        w[p] = 1.0
        if len(names) > 1:
            w = self._with_multipliers(normalised, p, [i for i in range(len(names)) if i != p], names, w)
        sq_norm = w @ normalised @ w
        magnitude = (w.abs() @ normalised.diagonal().sqrt()) ** 2
        keep = (sq_norm > _PRECISION * magnitude) & (gram[p, p] > 0)
        weights = torch.where(keep, w * scales * (gram[p, p] / sq_norm.clamp_min(1e-300)).sqrt(), 0.0)
        weights = torch.where(torch.isfinite(gram).all(), weights, torch.nan)  # the Balancer refuses the step
        return weights, PCDState(sq_norm_ema=scatter_by_name(state["sq_norm_ema"], names, ema), updates=counts)

    def _with_multipliers(
        self, normalised: Tensor, p: int, secondary: list[int], names: list[str], w: Tensor
    ) -> Tensor:
        """``w`` with the dual multipliers ``μ`` at the secondary groups, or ``w`` unchanged where the
        constraints are infeasible."""
        index = torch.tensor(secondary, dtype=torch.long).to(normalised.device)
        taus = [self.options.group_tau.get(names[i], self.options.tau) for i in secondary]
        tau = torch.tensor(taus, dtype=normalised.dtype).to(normalised.device)
        block = normalised.index_select(0, index).index_select(1, index)
        clean = torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite: NaN weights anyway
        target = tau * block.diagonal()
        b = torch.nan_to_num(target - normalised.index_select(0, index)[:, p], nan=0.0, posinf=0.0, neginf=0.0)
        mu = solve_nonneg_qp(clean, -b)
        violation = (b - clean @ mu).amax()
        allowed = _INFEASIBLE * target.amax() + _FLOOR * normalised.diagonal().amax()
        return torch.where(violation > allowed, w, w.index_copy(0, index, mu))
