"""The built-in plugins of ``balancer``.

They register through the same entry point group as third-party plugins (``balancer``), with
this module as the entry point; the core never imports it directly.
"""

from __future__ import annotations

from collections.abc import Callable

from balancer import Plugin, hookimpl

from .balanced_dpo import BalancedDPO, BalancedDPOOptions
from .task_norm import TaskNorm, TaskNormOptions

__all__ = ["BalancedDPO", "BalancedDPOOptions", "TaskNorm", "TaskNormOptions"]

BUILTIN_PLUGINS: tuple[type[Plugin], ...] = (TaskNorm, BalancedDPO)


@hookimpl
def balancer_register_plugins(register: Callable[[type[Plugin]], None]) -> None:
    for plugin_class in BUILTIN_PLUGINS:
        register(plugin_class)
