"""Split-half groups: an unbiased estimate of each task's squared gradient norm, and per-task balancing.

Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task LLMs* (arXiv 2510.19178) track
each task's squared gradient norm ``‖E g_k‖²``. The norm of one mini-batch gradient is biased
upward by the batch's noise: ``E‖ĝ_k‖² = ‖E g_k‖² + tr(Cov ĝ_k)``. Split the task's batch into
two independent halves of equal size and capture each as its own group, ``"math/A"`` and
``"math/B"``, with losses that add up to the task's loss (each half's loss divided by the size
of the *whole* task batch). Then ``g_k = g_A + g_B``, ``E g_A = E g_B = E g_k / 2``, and since the
halves are independent::

    E ⟨g_A, g_B⟩ = ‖E g_k‖² / 4,   so   4 ⟨g_A, g_B⟩   is unbiased for ‖E g_k‖².

``⟨g_A, g_B⟩`` is the cross entry of the Gram matrix the Balancer already computes: the estimate
costs nothing beyond capturing two groups instead of one. The halves must be independent given
the parameters: split by prompt (keep all rollouts of one prompt in the same half), and do not
measure on a batch the parameters have already been trained on.

A group ``"x/A"`` is pooled with ``"x/B"`` into task ``"x"`` when both are present in a step;
every other group is a task of its own. :class:`SplitHalf` runs plugins on the pooled tasks and
gives both halves their task's weight, so ``task_norm`` balances tasks, not halves.

Example::

    opt = Balancer(torch.optim.AdamW(model.parameters()), plugins=[SplitHalf(["task_norm"])])
    for task, (loss_a, loss_b) in half_losses.items():        # loss_a + loss_b = the task's loss
        opt.backward(dict(zip(half_groups(task), (loss_a, loss_b))))
    opt.step()
    split_half_sq_norms(opt.last_stats)                        # [tasks], unbiased ‖E g_k‖²
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from balancer.config import build_plugins
from balancer.contract.chain import Chain
from balancer.contract.plugin import Plugin, State
from balancer.contract.registry import Registry
from balancer.contract.stats import GroupStats

__all__ = ["SplitHalf", "half_groups", "pool_halves", "split_half_sq_norms", "task_layout"]

HALVES = ("A", "B")


def half_groups(task: str) -> tuple[str, str]:
    """The two group names of a task's halves: ``("math/A", "math/B")``."""
    return f"{task}/{HALVES[0]}", f"{task}/{HALVES[1]}"


def task_layout(names: Sequence[str]) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """Tasks in order of first appearance, and the group rows of each (two for a split task).

    Raises:
        ValueError: a pooled task's name is also the name of a group of the step.
    """
    present = set(names)
    tasks: list[str] = []
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        base, sep, half = name.rpartition("/")
        split = bool(sep) and half in HALVES and set(half_groups(base)) <= present
        task = base if split else name
        if split and task in present:
            raise ValueError(
                f"Group `{task}` and its halves `{task}/A`, `{task}/B` are in the same step: the pooled task "
                "would shadow the group. Rename one of them."
            )
        if task not in rows:
            tasks.append(task)
            rows[task] = []
        rows[task].append(i)
    return tuple(tasks), [tuple(rows[t]) for t in tasks]


def _pooling_matrix(rows: list[tuple[int, ...]], k: int, like: Tensor) -> Tensor:
    matrix = torch.zeros(len(rows), k, dtype=torch.float64, device=like.device)
    for t, members in enumerate(rows):
        matrix[t, list(members)] = 1.0
    return matrix


def pool_halves(stats: GroupStats) -> GroupStats:
    """Task-level stats: each split task's gradient is ``g_A + g_B`` (Gram ``M G Mᵀ``, losses summed).

    Norms of the pooled stats are the naive (upward-biased) estimates; weights, when present, are
    the mean weight of each task's groups.
    """
    tasks, rows = task_layout(stats.names)
    matrix = _pooling_matrix(rows, stats.num_groups, stats.gram)
    weights = None
    if stats.weights is not None:
        weights = (matrix @ stats.weights.to(matrix)) / matrix.sum(dim=1)
    return GroupStats(
        names=tasks,
        gram=matrix @ stats.gram @ matrix.T,
        losses=matrix @ stats.losses.to(matrix),
        backward_calls=tuple(sum(stats.backward_calls[i] for i in members) for members in rows),
        step=stats.step,
        weights=weights,
    )


def split_half_sq_norms(stats: GroupStats) -> Tensor:
    """``4 ⟨g_A, g_B⟩`` per task of :func:`pool_halves` (unbiased for ``‖E g_k‖²``; may be negative).

    ``nan`` for a task that was not split into halves in this step.
    """
    _, rows = task_layout(stats.names)
    values = [
        4.0 * stats.gram[members[0], members[1]] if len(members) == 2 else stats.gram.new_tensor(float("nan"))
        for members in rows
    ]
    return torch.stack(values)


class SplitHalf(Plugin):
    """Runs plugins on tasks pooled from their split halves; both halves get their task's weight.

    ``plugins`` takes what ``Balancer(plugins=...)`` takes: names, ``(name, options)`` pairs,
    specs or instances. The incoming weight of a task is the mean of its halves' incoming weights
    (ones when this is the first plugin). The inner plugins run as a :class:`~balancer.contract.chain.Chain`
    (errors name them ``split_half.<name>``); their states are kept under their names in this
    plugin's state, so a checkpoint loads only into a ``SplitHalf`` with the same inner plugins.
    """

    name = "split_half"

    def __init__(self, plugins: Iterable[Any] = (), *, registry: Registry | None = None) -> None:
        super().__init__()
        self.chain = Chain(build_plugins(plugins, registry, prefix="split_half."), prefix="split_half.")

    @property
    def inner(self) -> tuple[Plugin, ...]:
        """The plugins run on the pooled tasks, in order."""
        return self.chain.plugins

    def init(self) -> State:
        return self.chain.init()

    def check_state(self, state: State) -> None:
        """One entry per inner plugin, each checked by that plugin (its own "unknown" markers included)."""
        self.chain.check_state(state)

    def update(self, stats: GroupStats, weights: Tensor, state: State) -> tuple[Tensor, State]:
        _, rows = task_layout(stats.names)
        matrix = _pooling_matrix(rows, stats.num_groups, weights)
        pooled = dataclasses.replace(pool_halves(stats), weights=None)
        task_weights = (matrix @ weights.to(matrix)) / matrix.sum(dim=1)
        task_weights, new_state = self.chain.update(pooled, task_weights, state)
        return matrix.T @ task_weights.to(matrix), new_state

    def __repr__(self) -> str:
        return f"SplitHalf(plugins={list(self.inner)!r})"
