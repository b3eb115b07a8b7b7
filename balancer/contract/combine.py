"""``CombineRule``: a plugin that computes the update coordinate by coordinate from the group rows.

Most plugins return weights and the update is one GEMV, ``Σ_k w_k g_k``. A combine rule replaces
that GEMV: for every coordinate ``j`` the update is ``rule(r_1j … r_kj, j)`` where
``r_i = s·w_i·g_i`` are the group rows scaled by the weights of the plugins before it (``w``) and
by the GradScaler's ``1/scale`` (``s``, 1 without AMP). Coordinate-wise trimmed means, medians
and GradDrop's sign dropout are such rules.

Rules of the mechanism (checked when the Balancer is built, :func:`check_combine_rules`):

- at most one combine rule, and it is the last plugin (its ``update`` may still adjust the
  weights and its state; the weights it returns scale the rows it is handed);
- the backend must hold group rows (``Backend.combine_rules``): the local backend, DDP and FSDP2.
  DeepSpeed ZeRO and the layer capture (``backward_samples``/``backward_tasks``) are refused;
- a rule must be *coordinate-wise*: output ``j`` depends only on column ``j`` of the rows and on
  ``j``'s global index. Each rank then computes the rule on whatever columns it holds (its shard
  under FSDP2, the whole vector under DDP) with no communication, and the result equals one
  process's. Random rules draw from :func:`counter_uniform` of ``(seed, step, global index)``;
- clipping: the update norm no longer follows from ``wᵀGw``, so with a combine rule the step
  writes the update, measures its norm (one more pass over ``n`` numbers, plus an all-reduce of
  one scalar when sharded) and scales it (``balancer.step.plan.clip_route`` is ``"combined"``).

The global index of a coordinate is its position in the concatenation of every parameter of the
inner optimizer (``param_groups`` order, whole unsharded tensors flattened in row-major order): the
same on every rank and for every sharding.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from balancer.contract.plugin import Plugin, StateT
from balancer.contract.stats import GroupStats
from balancer.errors import CaptureError, ConfigError, PluginError

__all__ = [
    "BoundRule",
    "Columns",
    "CombineRule",
    "check_combine_rules",
    "column_sum",
    "counter_uniform",
    "find_combine_rule",
]

_M32 = 0xFFFFFFFF


def _mix32(x: Any) -> Any:
    """A 32-bit avalanche mix (xorshift-multiply), on Python ints or int64 tensors holding values in
    ``[0, 2**32)``: the multipliers are below ``2**31``, so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def counter_uniform(seed: int, step: int, index: Tensor) -> Tensor:
    """Uniform numbers in ``[0, 1)`` (float64, 32 random bits each), one per entry of ``index``.

    A counter-based draw: a hash of ``(seed, step, index)`` computed with int64 tensor ops, so the
    number for a coordinate depends only on those three, never on the device, the rank or how the
    parameters are sharded, and a run resumed from a checkpoint draws the same numbers.
    """
    key = _mix32(((_mix32(seed & _M32) ^ (step & _M32)) + 0x9E3779B9) & _M32)
    key2 = _mix32(key ^ ((seed >> 32) & _M32) ^ 0x85EBCA6)
    h = _mix32((index & _M32) ^ key)
    h = _mix32(h ^ (index >> 32) ^ key2)
    return h.to(torch.float64) * (1.0 / 4294967296.0)


def column_sum(rows: Tensor) -> Tensor:
    """``rows.sum(dim=0)``, added row by row in order: every column is rounded the same way whatever
    the width of the tile it comes in (``torch.sum`` may vectorise a column's additions differently
    for another width), so a rule built on it gives bit-identical results on every sharding."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


@dataclasses.dataclass
class Columns:
    """The columns of one tile handed to a rule: local columns ``[lo, hi)`` of a buffer whose
    segments ``local_starts[i]`` (local column) begin at global index ``global_starts[i]``."""

    lo: int
    hi: int
    local_starts: Tensor  # int64 [segments], ascending, first 0
    deltas: Tensor  # int64 [segments]: global index - local column within each segment

    def index(self) -> Tensor:
        """``[hi - lo]`` int64 global index of each column (computed only when a rule asks)."""
        cols = torch.arange(self.lo, self.hi, dtype=torch.int64, device=self.local_starts.device)
        if self.deltas.numel() == 1:
            return cols + self.deltas[0]
        segment = torch.searchsorted(self.local_starts, cols, right=True) - 1
        return cols + self.deltas[segment]


class CombineRule(Plugin[StateT]):
    """Base of the plugins whose update is a coordinate-wise function of the group rows.

    Subclasses implement :meth:`combine`; :meth:`update` (weights through, state unchanged by
    default) may record what :meth:`combine` needs in the state, which :meth:`combine` receives
    as the step's new state. See the module docstring for the mechanism and its rules.
    """

    @abc.abstractmethod
    def combine(self, rows: Tensor, columns: Columns, state: StateT) -> Tensor:
        """``[c]`` update of one tile from ``rows`` ``[k, c]`` (``s·w_i·g_i`` of the present groups,
        float32 or float64), one output per column; ``columns.index()`` gives their global indices.

        Called once per tile (several per step, each rank on its own columns): no host sync,
        nothing modified in place, and column ``j`` of the output may depend only on column ``j``
        of ``rows`` and its global index.
        """

    def update(self, stats: GroupStats, weights: Tensor, state: StateT) -> tuple[Tensor, StateT]:
        """Passes the weights through (they scale the rows :meth:`combine` sees)."""
        return weights, state


@dataclasses.dataclass
class BoundRule:
    """A combine rule with the state its step produced and the rows of the present groups."""

    rule: CombineRule[Any]
    state: Any
    keep: Sequence[int] | None = None  # rows to hand the rule (None: all); dropped groups left out

    def __call__(self, rows: Tensor, columns: Columns) -> Tensor:
        if self.keep is not None:
            rows = rows.index_select(0, torch.tensor(list(self.keep), dtype=torch.long, device=rows.device))
        try:
            out = self.rule.combine(rows, columns, self.state)
        except Exception as exc:
            raise PluginError(
                f"Plugin `{self.rule.name}` failed in combine(): {type(exc).__name__}: {exc}. Step refused; "
                "parameters and plugin states untouched."
            ) from exc
        if not isinstance(out, Tensor) or out.shape != (rows.shape[1],):
            found = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise PluginError(
                f"Plugin `{self.rule.name}` combine() returned {found} for {rows.shape[1]} columns; it must "
                "return one value per column. Step refused; parameters and plugin states untouched."
            )
        return out


def find_combine_rule(plugins: Sequence[Plugin[Any]]) -> CombineRule[Any] | None:
    """The combine rule of a plugin list (the last plugin, by :func:`check_combine_rules`), if any."""
    last = plugins[-1] if plugins else None
    return last if isinstance(last, CombineRule) else None


def check_combine_rules(plugins: Sequence[Plugin[Any]], backend: Any = None) -> None:
    """Refuses more than one combine rule, one that is not the last plugin, or a backend without
    group rows (``combine_rules`` false)."""
    rules = [i for i, p in enumerate(plugins) if isinstance(p, CombineRule)]
    if not rules:
        return
    names = [p.name for p in plugins]
    if len(rules) > 1:
        raise ConfigError(
            [
                (
                    "plugins",
                    f"Plugins {[names[i] for i in rules]} are all combine rules (they compute the update coordinate by "
                    f"coordinate); a Balancer can use one. Found plugins={names}: keep one of them.",
                )
            ]
        )
    if rules[0] != len(plugins) - 1:
        raise ConfigError(
            [
                (
                    "plugins",
                    f"Combine rule `{names[rules[0]]}` must be the last plugin: it computes the update from the "
                    "rows weighted by the plugins before it, so nothing can come after it. Found "
                    f"plugins={names}: move it last.",
                )
            ]
        )
    if backend is not None and not getattr(backend, "combine_rules", False):
        raise CaptureError(
            f"Combine rule `{names[rules[0]]}` needs the group rows, which {type(backend).__name__} does not "
            "expose coordinate by coordinate (supported: a plain optimizer, DDP, FSDP2). Use a weighting "
            "plugin instead, or train without DeepSpeed."
        )
