"""``GramWeighting``: the base of the plugins whose weights multiply the incoming ones.

Plugins compose by multiplying weights (:class:`~balancer.contract.chain.Chain`): a plugin after
others sees the already weighted gradients ``w_i g_i``, whose Gram matrix is
``diag(w) G diag(w)``, and returns ``w * a`` for its own factors ``a``. That rule is written once,
here: a subclass implements :meth:`GramWeighting.weigh`, its own weighting of the gradients
behind a Gram matrix (and of the losses), and never sees the incoming weights.

Example, weights inversely proportional to the gradient norms (each group's contribution to the
update then has norm 1)::

    class UnitNorm(GramWeighting):
        '''Gives every group's contribution to the update norm 1.'''

        name = "unit_norm"

        def weigh(self, stats, state):
            norms = stats.norms
            return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), 0.0), state
"""

from __future__ import annotations

import abc
import dataclasses

from torch import Tensor

from balancer.contract.plugin import Plugin, StateT
from balancer.contract.stats import GroupStats

__all__ = ["GramWeighting", "weighted_gram", "weighted_stats"]


def weighted_gram(gram: Tensor, weights: Tensor) -> Tensor:
    """``diag(w) G diag(w)``: the Gram matrix of the gradients ``w_i g_i``."""
    return weights[:, None] * gram * weights[None, :]


def weighted_stats(stats: GroupStats, weights: Tensor) -> GroupStats:
    """``stats`` of the gradients ``w_i g_i`` (the losses, names and step are unchanged)."""
    return dataclasses.replace(stats, gram=weighted_gram(stats.gram, weights))


class GramWeighting(Plugin[StateT]):
    """Base of the plugins that weigh the groups by factors multiplying the incoming weights.

    :meth:`update` hands :meth:`weigh` the stats of the weighted gradients ``w_i g_i`` (their Gram
    ``diag(w) G diag(w)``, so ``stats.norms`` are ``|w_i| ‖g_i‖``; the losses as recorded) and
    returns ``w * a`` for the factors ``a`` that :meth:`weigh` returns. With no plugin before it,
    ``w`` is all ones and :meth:`weigh` sees the gradients themselves.
    """

    def update(self, stats: GroupStats, weights: Tensor, state: StateT) -> tuple[Tensor, StateT]:
        """``(w * a, new_state)`` with ``(a, new_state) = weigh(stats of the w_i g_i, state)``."""
        factors, new_state = self.weigh(weighted_stats(stats, weights), state)
        return weights * factors, new_state

    @abc.abstractmethod
    def weigh(self, stats: GroupStats, state: StateT) -> tuple[Tensor, StateT]:
        """Returns ``(a, new_state)``: ``[k]`` factors of the gradients behind ``stats``.

        Same rules as :meth:`~balancer.contract.plugin.Plugin.update`: no host synchronisation,
        ``state`` is not modified in place. ``stats.gram`` is float64 on the device of the result.
        """
