"""Name clashes between packages: built-ins are never displaced, a name two packages claim is ambiguous.

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import importlib.metadata

import pytest

import balancer
from balancer import PluginLoadError, PluginWarning, Registry
from balancer.plugins import TaskNorm
from tests.balancer.contract.registry_fakes import (
    BUILTINS,
    OWN,
    FakeTaskNorm,
    Halver,
    OtherHalver,
    load_message,
    name_thief,
    path_of,
    two_packages_claiming_fake_halver,
)

# -- name clashes between packages --------------------------------------------------------------


def test_a_third_party_plugin_never_displaces_a_builtin_whatever_the_enumeration_order(installed) -> None:
    installed(name_thief(), importlib.metadata.distribution(OWN), own=False)  # the thief is enumerated first
    registry = Registry()

    with pytest.warns(PluginWarning) as record:
        names = registry.names()

    assert names == sorted(["fake_halver", *BUILTINS])  # every built-in, and the thief's other plugin
    assert (registry.get("task_norm").plugin_class, registry.get("task_norm").distribution) == (TaskNorm, OWN)
    assert registry.get("fake_halver").distribution == "name-thief"
    assert [str(w.message) for w in record] == [
        f"Plugin name `task_norm` of `name-thief` 0.4 is already taken by the built-in plugin of `{OWN}` "
        f"{balancer.__version__}; built-ins are never replaced, so it was skipped (the other plugins of "
        f"`name-thief` are loaded). To use it, pass the plugin class or an instance instead of the name: "
        f"`Balancer(opt, plugins=[{path_of(FakeTaskNorm)}()])` for `name-thief` 0.4. "
        "Set BALANCER_STRICT_PLUGINS=1 to make this an error."
    ]


def test_strict_mode_refuses_a_third_party_plugin_named_like_a_builtin(installed, monkeypatch) -> None:
    installed(name_thief(), importlib.metadata.distribution(OWN), own=False)
    monkeypatch.setenv("BALANCER_STRICT_PLUGINS", "1")
    registry = Registry()

    with pytest.raises(PluginLoadError) as excinfo:
        registry.get("task_norm")

    assert str(excinfo.value) == (
        load_message(
            "name-thief",
            "0.4",
            "plugins",
            f"PluginLoadError: Plugin name `task_norm` of `name-thief` 0.4 is already taken by the built-in plugin "
            f"of `{OWN}` {balancer.__version__}; built-ins are never replaced. To use it, pass the plugin class or "
            f"an instance instead of the name: `Balancer(opt, plugins=[{path_of(FakeTaskNorm)}()])` for "
            "`name-thief` 0.4",
        )
        + " Fix or uninstall that package, or unset BALANCER_STRICT_PLUGINS to only warn."
    )
    monkeypatch.delenv("BALANCER_STRICT_PLUGINS")  # nothing of the thief was half-registered by the failure
    with pytest.warns(PluginWarning, match="already taken by the built-in"):
        assert registry.names() == sorted(["fake_halver", *BUILTINS])


@pytest.mark.parametrize("reverse", [False, True], ids=["alpha-first", "beta-first"])
def test_a_name_two_packages_claim_is_ambiguous_whatever_the_enumeration_order(installed, reverse) -> None:
    dists = two_packages_claiming_fake_halver()
    installed(*(reversed(dists) if reverse else dists))
    registry = Registry()
    how_to_use = (
        "pass the plugin class or an instance instead of the name: "
        f"`Balancer(opt, plugins=[{path_of(Halver)}()])` for `alpha-plugins` 1.0, "
        f"or `Balancer(opt, plugins=[{path_of(OtherHalver)}()])` for `beta-plugins` 2.0."
    )

    with pytest.warns(PluginWarning) as record:
        names = registry.names()

    assert names == sorted(["fake_doubler", *BUILTINS])  # left out; the packages' other plugins load
    assert [str(w.message) for w in record] == [
        "Plugin name `fake_halver` is provided by `alpha-plugins` 1.0 and `beta-plugins` 2.0; the name is "
        "ambiguous, so it is left out and asking for it by name is an error (the other plugins of these packages "
        f"are loaded). To use one of them, {how_to_use} Set BALANCER_STRICT_PLUGINS=1 to make this an error."
    ]
    with pytest.raises(PluginLoadError) as excinfo:
        registry.get("fake_halver")
    assert str(excinfo.value) == (
        "Plugin name `fake_halver` is ambiguous: it is provided by `alpha-plugins` 1.0 and `beta-plugins` 2.0. "
        f"To use one of them, {how_to_use} Or uninstall all but one of these packages."
    )
    with pytest.raises(PluginLoadError) as excinfo:
        registry.register(Halver)
    assert str(excinfo.value) == (
        "Plugin name `fake_halver` from `<local>` is already registered by `alpha-plugins` and `beta-plugins`. "
        "Rename one of them."
    )


@pytest.mark.parametrize("reverse", [False, True], ids=["alpha-first", "beta-first"])
def test_strict_mode_refuses_a_name_two_packages_claim(installed, monkeypatch, reverse) -> None:
    dists = two_packages_claiming_fake_halver()
    installed(*(reversed(dists) if reverse else dists))
    monkeypatch.setenv("BALANCER_STRICT_PLUGINS", "1")

    with pytest.raises(PluginLoadError, match="Plugin name `fake_halver` is provided by `alpha-plugins` 1.0 and "):
        Registry().names()
