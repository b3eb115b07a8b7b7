"""Autoload off (BALANCER_DISABLE_PLUGIN_AUTOLOAD) and lazy loading, once per registry.

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import balancer
from balancer import Balancer, PluginLoadError, PluginWarning, Registry
from balancer.plugins import TaskNorm
from tests.balancer.contract.registry_fakes import (
    BROKEN,
    BUILTINS,
    Doubler,
    FakeDistribution,
    FakeEntryPoint,
    Halver,
    broken_distribution,
    doubler_distribution,
)


# -- autoload off -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_disable_autoload_skips_third_party_packages_but_keeps_builtins(installed, monkeypatch, value) -> None:
    fake, entry_point = doubler_distribution()
    installed(fake)
    monkeypatch.setenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", value)
    registry = Registry()

    assert registry.names() == BUILTINS
    assert entry_point.loads == 0
    with pytest.raises(
        PluginLoadError, match=f"Unknown plugin `fake_doubler`. Available plugins: {', '.join(BUILTINS)}. "
    ):
        registry.get("fake_doubler")


@pytest.mark.parametrize("value", ["0", "", "no"])
def test_autoload_stays_on_for_falsy_values(installed, monkeypatch, value) -> None:
    fake, _ = doubler_distribution()
    installed(fake)
    monkeypatch.setenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", value)

    assert Registry().names() == sorted(["fake_doubler", *BUILTINS])


def test_disable_autoload_recognises_the_own_distribution_under_any_spelling(installed, monkeypatch) -> None:
    own = FakeDistribution("Gradient_Balancer", "9.9", FakeEntryPoint("builtin", balancer.plugins))
    installed(own, own=False)
    monkeypatch.setenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", "1")

    info = Registry().get("task_norm")

    assert (info.distribution, info.version, info.plugin_class) == ("Gradient_Balancer", "9.9", TaskNorm)


def test_disable_autoload_still_accepts_plugin_classes_and_instances(installed, monkeypatch) -> None:
    fake, _ = doubler_distribution()
    installed(fake)
    monkeypatch.setenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", "1")
    param = torch.nn.Parameter(torch.zeros(2))

    opt = Balancer(torch.optim.SGD([param], lr=0.1), plugins=[Doubler, Halver()], registry=Registry())

    assert [type(p) for p in opt.plugins] == [Doubler, Halver]


# -- laziness -----------------------------------------------------------------------------------
def test_loading_is_lazy_and_happens_once(installed, monkeypatch) -> None:
    fake, entry_point = doubler_distribution()
    installed(fake)
    scans = []
    scan = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: scans.append(1) or scan())

    registry = Registry()
    assert (len(scans), entry_point.loads) == (0, 0)

    registry.names()
    registry.list()
    registry.get("fake_doubler")
    registry.load()
    Balancer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), plugins=["task_norm"], registry=registry)
    assert (len(scans), entry_point.loads) == (1, 1)

    Registry().names()  # a new registry loads on its own
    assert (len(scans), entry_point.loads) == (2, 2)


def test_a_broken_package_warns_only_once(installed) -> None:
    installed(broken_distribution("import-fails"))
    registry = Registry()

    with pytest.warns(PluginWarning) as record:
        registry.names()
        registry.names()
        registry.get("task_norm")

    assert len(record) == 1
    assert BROKEN["import-fails"][0].loads == 1
