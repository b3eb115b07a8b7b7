"""Plugin discovery: the built-ins through the project's own entry point, and third-party packages
through fake distributions.

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import torch

import balancer
from balancer import Balancer, PluginInfo, Registry
from balancer.plugins import TaskNorm
from tests.balancer.contract.registry_fakes import (
    BUILTINS,
    OWN,
    Doubler,
    FakeDistribution,
    FakeEntryPoint,
    Halver,
    doubler_distribution,
    hooks_module,
)


# -- the built-ins ------------------------------------------------------------------------------
def test_task_norm_comes_through_the_projects_own_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group="balancer")
    own = [ep for ep in entry_points if ep.dist is not None and ep.dist.metadata["Name"] == OWN]
    assert sorted((ep.name, ep.value) for ep in own) == [
        ("builtin", "balancer.plugins"),
        ("integrations", "balancer.integrations"),
    ]

    info = Registry().get("task_norm")

    assert info == PluginInfo(
        name="task_norm",
        distribution=OWN,
        version=balancer.__version__,
        summary=inspect.getdoc(TaskNorm).splitlines()[0],
        plugin_class=TaskNorm,
    )
    assert info.summary == "Equalizes per-group gradient norms: w_k = (target / ‖g_k‖)^alpha (Wu et al. 2025)."
    assert info.options_model is TaskNorm.Options


def test_a_distribution_found_twice_on_the_path_is_loaded_once(installed) -> None:
    installed(importlib.metadata.distribution(OWN))  # e.g. an editable install shadowing a wheel

    assert Registry().names() == BUILTINS  # no clash warning (warnings are errors here)


# -- third-party packages -----------------------------------------------------------------------
def test_third_party_plugin_is_listed_with_its_distribution_and_version(installed) -> None:
    fake, _ = doubler_distribution()
    installed(fake)
    registry = Registry()

    assert registry.names() == sorted(["fake_doubler", *BUILTINS])
    assert [info.name for info in registry.list()] == sorted(["fake_doubler", *BUILTINS])
    assert registry.get("fake_doubler") == PluginInfo(
        name="fake_doubler",
        distribution="fake-doubler-dist",
        version="2.5.1",
        summary="Multiplies every group's weight by a factor (a fake third-party plugin).",
        plugin_class=Doubler,
    )


def test_third_party_plugin_is_usable_by_name_in_balancer(installed) -> None:
    fake, _ = doubler_distribution()
    installed(fake)
    param = torch.nn.Parameter(torch.zeros(2))
    registry = Registry()
    opt = Balancer(torch.optim.SGD([param], lr=1.0), plugins=["fake_doubler"], registry=registry)

    with opt.group("a"):
        (param * torch.tensor([1.0, 0.0])).sum().backward()
    with opt.group("b"):
        (param * torch.tensor([0.0, 1.0])).sum().backward()
    opt.step()

    assert [type(p) for p in opt.plugins] == [Doubler]
    torch.testing.assert_close(opt.last_stats.weights, torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(param.detach(), torch.tensor([-2.0, -2.0]))  # lr · 2 · (g_a + g_b)

    tripler = Balancer(torch.optim.SGD([param], lr=1.0), plugins=[("fake_doubler", {"factor": 3.0})], registry=registry)
    assert tripler.plugins[0].options.factor == 3.0


def test_entry_points_of_other_groups_are_ignored(installed) -> None:
    other = FakeEntryPoint("cli", RuntimeError("must not be loaded"), group="console_scripts")
    installed(FakeDistribution("some-tool", "1.0", other))

    assert Registry().names() == BUILTINS
    assert other.loads == 0


def test_one_package_may_register_several_plugins(installed) -> None:
    installed(FakeDistribution("two-plugins", "0.3", FakeEntryPoint("both", hooks_module(Doubler, Halver))))

    infos = Registry().list()

    assert [(i.name, i.distribution, i.version) for i in infos] == sorted(
        [("fake_doubler", "two-plugins", "0.3"), ("fake_halver", "two-plugins", "0.3")]
        + [(name, OWN, balancer.__version__) for name in BUILTINS]
    )
