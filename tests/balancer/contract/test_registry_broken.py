"""Broken plugin packages: warnings naming the distribution, the others still load, strict mode.

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import pytest

from balancer import PluginLoadError, PluginWarning, Registry
from tests.balancer.contract.registry_fakes import (
    BROKEN,
    BUILTINS,
    broken_distribution,
    doubler_distribution,
    load_message,
)

# -- broken packages ----------------------------------------------------------------------------


def test_broken_packages_warn_with_their_distribution_and_the_others_still_load(installed) -> None:
    good, _ = doubler_distribution()
    installed(*(broken_distribution(kind) for kind in BROKEN), good)
    registry = Registry()

    with pytest.warns(PluginWarning) as record:
        names = registry.names()

    assert names == sorted(["fake_doubler", *BUILTINS])
    messages = [str(w.message) for w in record]
    assert len(messages) == len(BROKEN)
    for message, (kind, (_, error)) in zip(messages, BROKEN.items(), strict=True):
        assert message.startswith(f"Could not load balancer plugins from distribution `{kind}` 0.1 ")
        assert error in message
        assert message.endswith(
            "Plugins from other packages are unaffected; set BALANCER_STRICT_PLUGINS=1 to make this an error."
        )
    assert messages[0] == (
        load_message("import-fails", "0.1", "plugins", "ImportError: No module named 'missing_dependency'")
        + " Plugins from other packages are unaffected; set BALANCER_STRICT_PLUGINS=1 to make this an error."
    )


def test_a_package_whose_hook_fails_registers_none_of_its_plugins(installed) -> None:
    installed(broken_distribution("hook-raises"))  # registers Halver, then raises
    registry = Registry()

    with pytest.warns(PluginWarning, match="hook-raises"):
        assert registry.names() == BUILTINS


@pytest.mark.parametrize("kind", list(BROKEN))
def test_strict_mode_raises_plugin_load_error_naming_the_distribution(installed, monkeypatch, kind) -> None:
    installed(broken_distribution(kind))
    monkeypatch.setenv("BALANCER_STRICT_PLUGINS", "1")

    with pytest.raises(PluginLoadError) as excinfo:
        Registry().get("task_norm")

    message = str(excinfo.value)
    assert message.startswith(f"Could not load balancer plugins from distribution `{kind}` 0.1 ")
    assert BROKEN[kind][1] in message
    assert message.endswith("Fix or uninstall that package, or unset BALANCER_STRICT_PLUGINS to only warn.")


def test_strict_mode_keeps_failing_instead_of_returning_a_partial_registry(installed, monkeypatch) -> None:
    good, good_entry_point = doubler_distribution()
    installed(good, broken_distribution("import-fails"))
    monkeypatch.setenv("BALANCER_STRICT_PLUGINS", "1")
    registry = Registry()

    for _ in range(2):
        with pytest.raises(PluginLoadError, match="distribution `import-fails`"):
            registry.names()

    assert good_entry_point.loads == 1  # what loaded is not loaded again
    monkeypatch.delenv("BALANCER_STRICT_PLUGINS")
    with pytest.warns(PluginWarning, match="distribution `import-fails`"):
        assert registry.names() == sorted(["fake_doubler", *BUILTINS])
