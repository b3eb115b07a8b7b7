"""Lookups by name and registration by hand (register, register_hooks, unregister).

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import types

import pytest

import balancer
from balancer import Plugin, PluginInfo, PluginLoadError, Registry
from balancer.plugins import TaskNorm
from tests.balancer.contract.registry_fakes import (
    BUILTINS,
    OWN,
    Doubler,
    FakeTaskNorm,
    Halver,
    doubler_distribution,
    hooks_module,
)


# -- lookup -------------------------------------------------------------------------------------
def test_unknown_name_lists_the_available_plugins(installed) -> None:
    fake, _ = doubler_distribution()
    installed(fake)

    with pytest.raises(PluginLoadError) as excinfo:
        Registry().get("nope")

    assert str(excinfo.value) == (
        f"Unknown plugin `nope`. Available plugins: {', '.join(sorted(['fake_doubler', *BUILTINS]))}. "
        "Install the package that provides it, or pass the plugin class or instance directly."
    )


def test_unknown_name_with_no_plugins_at_all_says_none(installed) -> None:
    installed(own=False)

    with pytest.raises(PluginLoadError, match=r"^Unknown plugin `task_norm`. Available plugins: none. "):
        Registry().get("task_norm")


# -- registration by hand -----------------------------------------------------------------------
def test_register_by_hand(installed) -> None:
    installed()
    registry = Registry()

    registry.register(Doubler)
    registry.register(Halver, distribution="my-notebook", version="0.0.1")

    assert registry.names() == sorted(["fake_doubler", "fake_halver", *BUILTINS])
    assert registry.get("fake_doubler") == PluginInfo(
        name="fake_doubler",
        distribution="<local>",
        version="",
        summary="Multiplies every group's weight by a factor (a fake third-party plugin).",
        plugin_class=Doubler,
    )
    assert (registry.get("fake_halver").distribution, registry.get("fake_halver").version) == ("my-notebook", "0.0.1")


def test_register_hooks_by_hand(installed) -> None:
    installed()
    registry = Registry()

    registry.register_hooks(hooks_module(Doubler, Halver), distribution="scratch", version="7")

    assert [(i.name, i.distribution, i.version) for i in registry.list()] == sorted(
        [("fake_doubler", "scratch", "7"), ("fake_halver", "scratch", "7")]
        + [(name, OWN, balancer.__version__) for name in BUILTINS]
    )


def test_register_hooks_without_a_hook_is_an_error(installed) -> None:
    installed()
    undecorated = types.SimpleNamespace(balancer_register_plugins=lambda register: register(Doubler))

    with pytest.raises(PluginLoadError, match="implements no balancer hook"):
        Registry().register_hooks(undecorated)


def test_register_by_hand_clashing_with_another_hand_registered_plugin(installed) -> None:
    installed()
    registry = Registry()
    registry.register(Doubler, distribution="first")

    with pytest.raises(PluginLoadError) as excinfo:
        registry.register(Doubler, distribution="second")

    assert str(excinfo.value) == (
        "Plugin name `fake_doubler` from `second` is already registered by `first`. Rename one of them."
    )
    assert registry.get("fake_doubler").distribution == "first"


def test_register_by_hand_clashing_with_a_builtin_is_reported_against_the_caller(installed) -> None:
    installed()
    registry = Registry()

    with pytest.raises(PluginLoadError) as excinfo:
        registry.register(FakeTaskNorm)  # before anything was loaded: the built-in must still win

    assert str(excinfo.value) == (
        f"Plugin name `task_norm` from `<local>` is already registered by `{OWN}`. Rename one of them."
    )
    assert registry.get("task_norm").plugin_class is TaskNorm


def test_a_hook_registering_one_name_twice_is_refused(installed) -> None:
    installed()

    registry = Registry()

    with pytest.raises(PluginLoadError) as excinfo:
        registry.register_hooks(hooks_module(Halver, Halver), distribution="twice")

    assert str(excinfo.value) == (
        "Plugin name `fake_halver` from `twice` is already registered by `twice`. Rename one of them."
    )
    assert registry.names() == BUILTINS


def test_unregister_frees_the_name(installed) -> None:
    installed()
    registry = Registry()
    registry.register(Doubler)

    registry.unregister("fake_doubler")
    registry.unregister("never_registered")  # no error

    assert registry.names() == BUILTINS
    registry.register(Doubler, distribution="again")
    assert registry.get("fake_doubler").distribution == "again"


class NoName(Plugin):
    """Forgot to set a name."""

    def update(self, stats, weights, state):
        return weights, state


class BadName(Halver):
    """A name with a space."""

    name = "bad name"


class BadOptions(Halver):
    """Options that are not a PluginOptions model."""

    name = "bad_options"
    Options = dict


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (object, "register() takes a subclass of balancer.Plugin. Found `<class 'object'>`."),
        (Halver(), "register() takes a subclass of balancer.Plugin. Found `Halver()`."),
        (NoName, "Plugin class `NoName` must set `name` to an identifier-like string. Found `name = None`."),
        (BadName, "Plugin class `BadName` must set `name` to an identifier-like string. Found `name = 'bad name'`."),
        (BadOptions, "Plugin `bad_options`: `Options` must subclass balancer.PluginOptions."),
    ],
    ids=["not-a-class", "instance", "no-name", "bad-name", "bad-options"],
)
def test_register_refuses_what_is_not_a_proper_plugin_class(installed, obj, message) -> None:
    installed()
    registry = Registry()

    with pytest.raises(TypeError) as excinfo:
        registry.register(obj)

    assert str(excinfo.value) == message
    assert registry.names() == BUILTINS
