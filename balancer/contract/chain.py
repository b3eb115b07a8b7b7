"""``Chain``: plugins run in order, ``w = p_n(… p_1(stats, ones) …)``.

The Balancer's step runs its plugins as one chain (:func:`run_plugins`); a plugin that runs other
plugins (:class:`~balancer.recipes.split_half.SplitHalf`) holds a chain of its own and calls
:meth:`Chain.update`, which is itself the plugin protocol's ``update`` over a dict of states.
Each plugin gets a copy of its state (a plugin that writes into its input changes nothing the
caller holds), its failure is a :class:`~balancer.errors.PluginError` naming it, and the weights it
returns are checked (a ``[k]`` floating tensor on the stats' device). Whether every plugin's
weights are finite is read in one host synchronisation, by :meth:`Chain.run` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from balancer._checks import check_weights
from balancer._copy import copy_state
from balancer.contract.combine import CombineRule
from balancer.contract.plugin import Plugin
from balancer.contract.state_checks import InvalidStateError, State
from balancer.contract.stats import GroupStats
from balancer.errors import ConfigError, PluginError

__all__ = ["Chain", "run_plugins"]

_REFUSED = "Step refused; parameters and plugin states untouched."


class Chain:
    """Plugins applied in order; each gets the weights the previous one returned (ones first).

    ``prefix`` is put before the plugins' names in errors (``"split_half."`` for a nested chain).
    States are a dict keyed by plugin name.
    """

    def __init__(self, plugins: Iterable[Plugin], *, prefix: str = "") -> None:
        self.plugins: tuple[Plugin, ...] = tuple(plugins)
        self.prefix = prefix
        rules = [p.name for p in self.plugins if isinstance(p, CombineRule) and prefix]
        if rules:  # a CombineRule acts on the rows, which only the Balancer's own chain reaches
            raise ConfigError(
                [
                    (
                        "plugins",
                        f"Combine rule(s) {rules} inside `{prefix.rstrip('.')}`: a combine rule computes the update "
                        "from the group rows, so it can only be the last plugin of the Balancer itself. List it there.",
                    )
                ]
            )
        if self.plugins and self.plugins[0].needs_earlier_plugin:
            first = self.plugins[0].name
            raise ConfigError(
                [
                    (
                        f"{prefix}plugins.0",
                        f"`{first}` transforms the weights of the plugins before it, so as the first plugin it "
                        f"receives ones at every step and does nothing. Place it after the plugin whose weights it "
                        f'should transform, e.g. plugins=["mgda", "{first}"].',
                    )
                ]
            )

    def init(self) -> dict[str, State]:
        """Every plugin's initial state, by name."""
        return {plugin.name: plugin.init() for plugin in self.plugins}

    def check_state(self, states: Mapping[str, State]) -> None:
        """One state per plugin, each checked by its plugin; :class:`InvalidStateError` paths start
        with the plugin's name (``"task_norm.ema_norms.a"``)."""
        names = [plugin.name for plugin in self.plugins]
        if not isinstance(states, dict) or sorted(states) != sorted(names):
            found = sorted(states) if isinstance(states, dict) else type(states).__name__
            raise InvalidStateError("", f"found {found}; expected one entry per inner plugin {names}")
        for plugin in self.plugins:
            try:
                plugin.check_state(states[plugin.name])
            except InvalidStateError as exc:
                raise InvalidStateError(f"{plugin.name}.{exc.path}" if exc.path else plugin.name, exc.problem) from None

    def update(
        self, stats: GroupStats, weights: Tensor, states: Mapping[str, State]
    ) -> tuple[Tensor, dict[str, State]]:
        """``(weights, new_states)`` after every plugin, with no host synchronisation (the
        weights are not checked for finiteness: the caller's chain does it)."""
        weights, new_states, _ = self._apply(stats, weights, states)
        return weights, new_states

    def run(self, stats: GroupStats, states: Mapping[str, State]) -> tuple[Tensor, dict[str, State]]:
        """The chain from ones; raises :class:`PluginError` naming the first plugin whose weights
        are not finite (one host synchronisation for all of them)."""
        ones = torch.ones(stats.num_groups, dtype=torch.float64, device=stats.gram.device)
        weights, new_states, finite = self._apply(stats, ones, states)
        if finite:
            for plugin, ok in zip(self.plugins, torch.stack(finite).tolist(), strict=True):
                if not ok:
                    raise PluginError(
                        f"Plugin `{self.prefix}{plugin.name}` returned non-finite weights for groups "
                        f"{list(stats.names)}. {_REFUSED}"
                    )
        return weights, new_states

    def _apply(
        self, stats: GroupStats, weights: Tensor, states: Mapping[str, State]
    ) -> tuple[Tensor, dict[str, State], list[Tensor]]:
        new_states = dict(states)
        finite: list[Tensor] = []
        for plugin in self.plugins:
            name = f"{self.prefix}{plugin.name}"
            try:
                out, new_states[plugin.name] = plugin.update(stats, weights, copy_state(new_states[plugin.name]))
            except PluginError as exc:
                if getattr(exc, "from_chain", False):  # a nested chain already named its plugin
                    raise
                raise _failure(name, exc) from exc
            except Exception as exc:
                raise _failure(name, exc) from exc
            try:
                weights = check_weights(name, out, stats)
            except PluginError as exc:
                exc.from_chain = True  # type: ignore[attr-defined]
                raise
            finite.append(torch.isfinite(weights).all())
        return weights, new_states, finite

    def __repr__(self) -> str:
        return f"Chain({list(self.plugins)!r})"


def _failure(name: str, exc: Exception) -> PluginError:
    error = PluginError(f"Plugin `{name}` failed in update(): {type(exc).__name__}: {exc}. {_REFUSED}")
    error.from_chain = True  # type: ignore[attr-defined]
    return error


def run_plugins(
    plugins: Iterable[Plugin], states: Mapping[str, State], stats: GroupStats
) -> tuple[Tensor, dict[str, State]]:
    """The Balancer's step: ``Chain(plugins).run(stats, states)``; ``states`` is not modified."""
    return Chain(plugins).run(stats, states)
