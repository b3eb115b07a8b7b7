"""How :class:`~balancer.contract.registry.Registry` words a plugin name clash, and who may still be used.

The rules themselves are in the registry's module docstring: built-ins (this project's
distribution) keep their names, a name provided by two third-party packages is ambiguous, and a
plugin left without its name stays usable as a class or an instance.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from balancer.contract.registry import PluginInfo

__all__ = ["OWN_DISTRIBUTION", "ambiguity", "clash", "describe", "how_to_use", "normalize"]

OWN_DISTRIBUTION = "gradient-balancer"


def normalize(dist_name: str) -> str:
    """PEP 503 normalized distribution name: `Gradient_Balancer` and `gradient-balancer` are the same."""
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def describe(info: PluginInfo) -> str:
    return f"`{info.distribution}` {info.version}" if info.version else f"`{info.distribution}`"


def ambiguity(name: str, providers: list[PluginInfo]) -> str:
    return f"Plugin name `{name}` is provided by {' and '.join(map(describe, providers))}"


def clash(new: PluginInfo, owners: list[PluginInfo]) -> tuple[str, list[PluginInfo]]:
    """A name clash in words, and the plugins of that name a user can still pick (as classes)."""
    if normalize(owners[0].distribution) == OWN_DISTRIBUTION:
        taken = f"is already taken by the built-in plugin of {describe(owners[0])}; built-ins are never replaced"
        return f"Plugin name `{new.name}` of {describe(new)} {taken}", [new]
    # Sorted, so that warnings and errors are the same whatever the enumeration order.
    providers = sorted([*owners, new], key=lambda i: (normalize(i.distribution), i.version, str(i.plugin_class)))
    return ambiguity(new.name, providers), providers


def how_to_use(infos: list[PluginInfo]) -> str:
    """How to use a plugin that is not available by name: pass its class or an instance."""
    ways = ", or ".join(
        f"`Balancer(opt, plugins=[{i.plugin_class.__module__}.{i.plugin_class.__qualname__}()])` for {describe(i)}"
        for i in infos
    )
    which = "it" if len(infos) == 1 else "one of them"
    return f"To use {which}, pass the plugin class or an instance instead of the name: {ways}."
