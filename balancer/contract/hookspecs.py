"""Every hook that ``balancer`` defines, in one place.

Plugin packages implement these with :data:`balancer.hookimpl` and expose the module (or an
object) through an entry point in the group ``balancer``::

    # pyproject.toml of a third-party package
    [project.entry-points.balancer]
    my_plugins = "my_package.balancer_plugins"

    # my_package/balancer_plugins.py
    from balancer import hookimpl

    @hookimpl
    def balancer_register_plugins(register):
        register(MyPlugin)

Hooks are used only to discover plugins; they are never called on the per-step path, and the
order in which pluggy calls them never decides numerical order (the user's plugin list does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from balancer.contract.backend import Backend
    from balancer.contract.plugin import Plugin

PROJECT_NAME = "balancer"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def balancer_register_plugins(register: Callable[[type[Plugin]], None]) -> None:
    """Register plugin classes by calling ``register(PluginClass)`` once per class.

    Each class must subclass :class:`balancer.Plugin` and set a unique ``name``. Registering a
    name that is already taken is an error reported against the registering package.
    """


@hookspec(firstresult=True)
def balancer_make_backend(target: Any) -> Backend | None:
    """Return a :class:`balancer.contract.backend.Backend` for ``target``, or ``None`` to decline.

    ``target`` is what was passed to ``Balancer(target, ...)``: a torch optimizer or a framework
    object such as a DeepSpeed engine. The first non-``None`` answer is used; when every
    implementation declines, a ``torch.optim.Optimizer`` gets the local backend. Called once, at
    construction.
    """
