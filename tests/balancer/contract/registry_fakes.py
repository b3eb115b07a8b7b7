"""Fakes for the registry tests: entry points, distributions, hook modules and small plugins.

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import balancer
from balancer import Plugin, PluginOptions
from balancer.plugins import BUILTIN_PLUGINS

OWN = "gradient-balancer"

BUILTINS = sorted(plugin.name for plugin in BUILTIN_PLUGINS)


# -- fakes --------------------------------------------------------------------------------------
class FakeEntryPoint:
    """What ``Distribution.entry_points`` yields: ``group``, ``name``, ``value`` and ``load()``.

    ``target`` is what ``load()`` returns, or an exception it raises. ``loads`` counts the calls.
    """

    def __init__(self, name: str, target: object, group: str = "balancer") -> None:
        self.name = name
        self.group = group
        self.value = f"fake_package.{name}"
        self.target = target
        self.loads = 0

    def load(self) -> object:
        self.loads += 1
        if isinstance(self.target, BaseException):
            raise self.target
        return self.target


class FakeDistribution:
    """What ``importlib.metadata.distributions()`` yields: ``metadata["Name"]``, ``version``,
    ``entry_points``."""

    def __init__(self, name: str, version: str, *entry_points: FakeEntryPoint) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = list(entry_points)


def hooks_module(*plugin_classes: object, fail: Exception | None = None) -> types.ModuleType:
    """A module-like object implementing the hook: registers ``plugin_classes``, then raises ``fail``."""
    module = types.ModuleType("fake_balancer_plugins")

    @balancer.hookimpl
    def balancer_register_plugins(register: Callable[[type[Plugin]], None]) -> None:
        for plugin_class in plugin_classes:
            register(plugin_class)
        if fail is not None:
            raise fail

    module.balancer_register_plugins = balancer_register_plugins
    return module


class Doubler(Plugin):
    """Multiplies every group's weight by a factor (a fake third-party plugin).

    More text that is not part of the summary.
    """

    name = "fake_doubler"

    class Options(PluginOptions):
        factor: float = 2.0

    def update(self, stats, weights, state):
        return weights * self.options.factor, state


class Halver(Plugin):
    """Halves every group's weight."""

    name = "fake_halver"

    def update(self, stats, weights, state):
        return weights / 2, state


class FakeTaskNorm(Halver):
    """Claims the name of a built-in."""

    name = "task_norm"


def doubler_distribution() -> tuple[FakeDistribution, FakeEntryPoint]:
    entry_point = FakeEntryPoint("doubler", hooks_module(Doubler))
    return FakeDistribution("fake-doubler-dist", "2.5.1", entry_point), entry_point


def load_message(dist: str, version: str, entry_point: str, error: str) -> str:
    return (
        f"Could not load balancer plugins from distribution `{dist}` {version} "
        f"(entry point `{entry_point} = fake_package.{entry_point}`): {error}."
    )


BROKEN = {
    "import-fails": (
        FakeEntryPoint("plugins", ImportError("No module named 'missing_dependency'")),
        "ImportError: No module named 'missing_dependency'",
    ),
    "hook-raises": (
        FakeEntryPoint("plugins", hooks_module(Halver, fail=RuntimeError("hook exploded"))),
        "RuntimeError: hook exploded",
    ),
    "registers-non-plugin": (
        FakeEntryPoint("plugins", hooks_module("not a plugin")),
        "TypeError: register() takes a subclass of balancer.Plugin. Found `'not a plugin'`",
    ),
    "forgot-hookimpl": (
        FakeEntryPoint("plugins", types.SimpleNamespace(balancer_register_plugins=lambda register: None)),
        "implements no balancer hook (`balancer_register_plugins` or `balancer_make_backend`). "
        "Define one and decorate it with `@balancer.hookimpl`",
    ),
}


def broken_distribution(kind: str) -> FakeDistribution:
    entry_point, _ = BROKEN[kind]
    entry_point.loads = 0
    return FakeDistribution(kind, "0.1", entry_point)


class OtherHalver(Halver):
    """Another package's plugin with the same name as ``Halver``."""


def path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def name_thief() -> FakeDistribution:
    """A package registering a plugin named like a built-in, and one plugin of its own."""
    return FakeDistribution("name-thief", "0.4", FakeEntryPoint("plugins", hooks_module(FakeTaskNorm, Halver)))


def two_packages_claiming_fake_halver() -> list[FakeDistribution]:
    return [
        FakeDistribution("alpha-plugins", "1.0", FakeEntryPoint("plugins", hooks_module(Halver, Doubler))),
        FakeDistribution("beta-plugins", "2.0", FakeEntryPoint("plugins", hooks_module(OtherHalver))),
    ]
