"""``modo``: MoDo, multi-objective gradient with double sampling (Chen et al., JMLR 2024), from the Gram matrix.

Also home of what ``modo`` and ``sdmgrad`` share: the Euclidean projection onto the simplex and the
sampled matrix ``∇F_ξᵀ ∇F_ξ'`` both methods read (the Gram matrix, or the cross matrix of split halves).
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginError, PluginOptions
from balancer.contract.weighting import GramWeighting
from balancer.recipes.split_half import task_layout

from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = [
    "MoDo",
    "MoDoOptions",
    "MoDoState",
    "Estimate",
    "SampledMatrix",
    "project_onto_simplex",
    "sampled_matrix",
    "SimplexState",
    "SimplexWeighting",
]

Estimate = Literal["naive", "split_half"]
ESTIMATE_HELP = (
    "Where the two independent samples ξ, ξ' come from: 'naive' takes the step's gradients for both (the Gram "
    "matrix; ξ = ξ'), 'split_half' the two halves 'x/A', 'x/B' of every task (their cross inner products)."
)


def project_onto_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of ``y`` (``[k]``) onto ``{x ≥ 0, Σ x = 1}`` without host synchronisation.

    With ``u`` the entries sorted in decreasing order and ``c_j = Σ_{i≤j} u_i``, the projection is
    ``max(y - θ, 0)`` with ``θ = (c_ρ - 1) / ρ``, ``ρ`` the largest ``j`` with ``u_j > (c_j - 1) / j``
    (Held, Wolfe, Crowder 1974; Duchi et al. 2008). ``j = 1`` always qualifies, so ``ρ ≥ 1``.
    ``y`` is first shifted by its largest entry (the projection does not change): otherwise entries
    far above 1 in size round ``y - θ`` to 0 and the result leaves the simplex (torchjd 0.18's
    projection returns all zeros for ``[1e17, 1e17, 0]``).
    """
    y = y - y.max()
    u = torch.sort(y, descending=True).values
    cumulative = u.cumsum(0)
    j = torch.arange(1, y.shape[0] + 1, dtype=y.dtype, device=y.device)
    rho = torch.where(u > (cumulative - 1.0) / j, j, 1.0).max()
    theta = (cumulative.gather(0, (rho - 1.0).long().reshape(1)) - 1.0) / rho
    return (y - theta).clamp_min(0.0)


class SampledMatrix:
    """The matrix ``M = ∇F_ξᵀ ∇F_ξ'`` of one step over its tasks, and which task each group belongs to.

    ``naive``: the tasks are the groups and ``M = G`` (the same sample twice). ``split_half``: every
    group is a half ``"x/A"`` or ``"x/B"``; with halves whose losses add up to the task's loss, ``2 g_A``
    and ``2 g_B`` are the mean gradients of two independent half batches, and ``M_ij = 4 ⟨g_iA, g_jB⟩``.
    """

    def __init__(self, stats: GroupStats, estimate: Estimate, plugin: str) -> None:
        if estimate == "naive":
            self.names: tuple[str, ...] = stats.names
            self.matrix = stats.gram
            self.group_task = list(range(stats.num_groups))
            return
        tasks, rows = task_layout(stats.names)
        unpaired = [stats.names[r[0]] for r in rows if len(r) != 2]
        if unpaired:
            raise PluginError(
                f"{plugin} with estimate='split_half' needs every group captured as two halves 'x/A' and 'x/B' "
                f"(balancer.recipes.split_half.half_groups); found groups without their other half: {unpaired}. "
                "Capture each task as two halves, or use estimate='naive'."
            )
        first = [stats.names[r[0]].endswith("/A") for r in rows]
        a = [r[0] if is_a else r[1] for r, is_a in zip(rows, first, strict=True)]
        b = [r[1] if is_a else r[0] for r, is_a in zip(rows, first, strict=True)]
        device = stats.gram.device
        self.names = tasks
        self.matrix = 4.0 * stats.gram.index_select(0, torch.tensor(a, device=device)).index_select(
            1, torch.tensor(b, device=device)
        )
        self.group_task = [0] * stats.num_groups
        for t, members in enumerate(rows):
            for i in members:
                self.group_task[i] = t

    def to_groups(self, task_weights: Tensor) -> Tensor:
        """Per-group weights: every half gets its task's weight."""
        return task_weights.index_select(0, torch.tensor(self.group_task, device=task_weights.device))


def sampled_matrix(stats: GroupStats, estimate: Estimate, plugin: str) -> SampledMatrix:
    """:class:`SampledMatrix` of ``stats`` (raises :class:`PluginError` for an unpaired half)."""
    return SampledMatrix(stats, estimate, plugin)


class MoDoOptions(PluginOptions):
    """Options of :class:`MoDo`."""

    gamma: float = Field(0.1, gt=0.0, description="Step size γ of the weights' projected gradient step (torchjd 0.1).")
    rho: float = Field(0.1, ge=0.0, description="ℓ2 regularisation ρ of the weights (torchjd 0.1).")
    estimate: Estimate = Field("naive", description=ESTIMATE_HELP)


class SimplexState(TypedDict):
    """State of :class:`MoDo` (λ) and :class:`~balancer.plugins.SDMGrad` (its inner ``w``): one
    weight per task seen, over ``names``."""

    names: list[str]  # every task seen so far, in order of first appearance
    weights: Tensor  # [m] on the simplex over the tasks of the last step they took part in


MoDoState = SimplexState


class SimplexWeighting(GramWeighting[SimplexState]):
    """Base of the plugins whose state is one simplex weight per task name (MoDo, SDMGrad)."""

    def init(self) -> SimplexState:
        return SimplexState(names=[], weights=torch.zeros(0, dtype=torch.float64))

    def check_state(self, state: SimplexState) -> None:
        """One weight per stored name, none negative."""
        super().check_state(state)
        check_named_state(state, vectors=("weights",))
        check_nonnegative(state["weights"], "weights")


class MoDo(SimplexWeighting):
    """Weights that track the conflict-avoiding direction by one projected step per update (Chen et al. 2024).

    Chen, Fernando, Ying, Chen, *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance*, JMLR 25 (2024), Algorithm 1 (eq. 2.9). With two
    independent samples ``ξ, ξ'``, ``M = ∇F_ξᵀ ∇F_ξ'`` (``k×k``) and the weights ``λ`` of the state::

        λ ← Π_Δ( λ - γ (M λ + ρ λ) ),        d = Σ_i λ_i g_i

    (``Π_Δ`` the Euclidean projection onto the simplex): a stochastic gradient step on
    ``½ ‖∇F λ‖² + ½ ρ ‖λ‖²``, whose minimiser over the simplex is MGDA's direction (``ρ = 0``).
    Only inner products enter, so the update is exact from the Balancer's Gram matrix: with
    ``estimate="naive"`` ``M = G`` (``ξ = ξ'``: the step's own gradients, whose noise biases
    ``M`` upward on the diagonal); with ``estimate="split_half"`` each task is captured as two
    independent halves ``"x/A"``, ``"x/B"`` (:mod:`balancer.recipes.split_half`) and
    ``M_ij = 4 ⟨g_iA, g_jB⟩`` is the paper's double-sampled matrix at no extra cost; both halves
    get their task's weight, so the update is ``λ`` on the whole batch (the mean of the two
    samples, torchjd's two-batch example). The paper's third sample ``z`` for the update (and
    torchjd's three-batch example) would need a third batch: not captured here.

    ``MoDoWeighting`` of torchjd 0.18 computes the same step on the ``k×k`` matrix it is given
    (tested equal over many steps). The weights start at ``1/k``; state is keyed by task name, a
    new task starts at ``1/k`` and the step's entries are projected together (absent tasks keep
    theirs). With incoming weights ``w`` it weighs the gradients ``w_i g_i`` and returns ``w * λ``.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("modo", {"gamma": 0.1, "rho": 0.0})])
    """

    name = "modo"
    Options = MoDoOptions
    options: MoDoOptions

    def weigh(self, stats: GroupStats, state: MoDoState) -> tuple[Tensor, MoDoState]:
        opts = self.options
        sampled = sampled_matrix(stats, opts.estimate, self.name)
        device = stats.gram.device
        named = NamedIndex(state["names"], sampled.names, device)
        full = named.vector(state["weights"], 1.0 / len(sampled.names), device)
        lam = named.take(full)
        lam = project_onto_simplex(lam - opts.gamma * (sampled.matrix @ lam + opts.rho * lam))
        new = MoDoState(names=named.names, weights=named.put(full, lam))
        return sampled.to_groups(lam), new

    def metrics(self, state: MoDoState) -> dict[str, object]:
        """λ of every task seen, by name."""
        return {f"lambda/{name}": state["weights"][i] for i, name in enumerate(state["names"])}
