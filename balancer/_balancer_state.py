"""The Balancer's own state (plugin states, step count, rows seen): saved and loaded with the inner
optimizer's state dict, as its ``"balancer"`` section, and changed by ``update_plugin_state``.

The section's format and validation are in :mod:`balancer._checkpoint_section`; here it is read
from and written to a :class:`~balancer.Balancer`. A loaded section is validated in full before
anything is restored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from balancer._checkpoint_section import load_balancer_section, make_balancer_section
from balancer._copy import copy_state
from balancer.contract.plugin import InvalidStateError, State, check_state_types
from balancer.errors import PluginError

if TYPE_CHECKING:
    from balancer.optimizer import Balancer

__all__ = ["change_plugin_state", "load_section", "load_state_dict", "make_section", "make_state_dict"]


def make_section(opt: Balancer) -> dict[str, Any]:
    """The ``"balancer"`` section: plugin names, versions, states, step count, rows seen."""
    return make_balancer_section(opt._plugins, opt._plugin_states, opt._step_count, opt._rows_seen)


def make_state_dict(opt: Balancer) -> dict[str, Any]:
    """The inner optimizer's state dict plus the ``"balancer"`` section."""
    sd = opt.inner.state_dict()
    sd["balancer"] = make_section(opt)
    return sd


def load_state_dict(opt: Balancer, state_dict: dict[str, Any]) -> None:
    """Loads a :func:`make_state_dict`; the section is checked before the inner optimizer loads."""
    section = state_dict.get("balancer")
    states, step = load_balancer_section(section, opt._plugins, opt._backend.stats_device)  # refuse first
    opt.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "balancer"})
    _restore(opt, states, step, section)


def load_section(opt: Balancer, section: dict[str, Any] | None) -> None:
    """Restores a :func:`make_section`; the plugin list must match the saved one."""
    _restore(opt, *load_balancer_section(section, opt._plugins, opt._backend.stats_device), section)


def _restore(opt: Balancer, states: dict[str, State], step: int, section: dict[str, Any] | None) -> None:
    opt._plugin_states.update(states)
    opt._step_count = step
    # The rows of a long run live in one merged block; reserving it now makes the first
    # steps after a resume sum in the same order as the uninterrupted run (bit-exact resume).
    opt._rows_seen = int(section.get("rows", 0)) if isinstance(section, dict) else 0
    opt._backend.reserve_rows(opt._rows_seen)


def change_plugin_state(opt: Balancer, name: str, change: Callable[[State], State]) -> None:
    """Replaces plugin ``name``'s state by ``change(copy)``, checked as a loaded state is; a refused
    state leaves the old one in place."""
    plugin = next((p for p in opt._plugins if p.name == name), None)
    if plugin is None:
        raise KeyError(
            f"update_plugin_state: no plugin named {name!r}; this Balancer has {[p.name for p in opt._plugins]}."
        )
    new = change(copy_state(opt._plugin_states[name]))
    try:
        check_state_types(new)
        plugin.check_state(new)
    except (InvalidStateError, ValueError, TypeError) as exc:
        raise PluginError(
            f"update_plugin_state({name!r}): plugin `{name}` refuses the new state: {exc}. State left as it was."
        ) from None
    opt._plugin_states[name] = new
