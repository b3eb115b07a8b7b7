"""Plugin discovery: the built-ins through the project's own entry point, third-party packages
through fake distributions, broken packages, strict mode, autoload off, laziness, lookups and
registration by hand.

Every test builds its own ``Registry``; ``balancer.default_registry`` is never touched.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import types
from collections.abc import Callable

import pytest
import torch

import balancer
from balancer import Balancer, Plugin, PluginInfo, PluginLoadError, PluginOptions, PluginWarning, Registry
from balancer.plugins import BUILTIN_PLUGINS, TaskNorm

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


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``installed(*fake_distributions)``: the environment holds this project plus those packages,
    in that order. ``installed(..., own=False)`` leaves this project out."""

    def install(*fakes: FakeDistribution, own: bool = True) -> None:
        dists = [importlib.metadata.distribution(OWN)] if own else []
        dists.extend(fakes)
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))

    monkeypatch.delenv("BALANCER_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return install


def doubler_distribution() -> tuple[FakeDistribution, FakeEntryPoint]:
    entry_point = FakeEntryPoint("doubler", hooks_module(Doubler))
    return FakeDistribution("fake-doubler-dist", "2.5.1", entry_point), entry_point


def load_message(dist: str, version: str, entry_point: str, error: str) -> str:
    return (
        f"Could not load balancer plugins from distribution `{dist}` {version} "
        f"(entry point `{entry_point} = fake_package.{entry_point}`): {error}."
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


# -- broken packages ----------------------------------------------------------------------------
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


# -- name clashes between packages --------------------------------------------------------------
class OtherHalver(Halver):
    """Another package's plugin with the same name as ``Halver``."""


def path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def name_thief() -> FakeDistribution:
    """A package registering a plugin named like a built-in, and one plugin of its own."""
    return FakeDistribution("name-thief", "0.4", FakeEntryPoint("plugins", hooks_module(FakeTaskNorm, Halver)))


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


def two_packages_claiming_fake_halver() -> list[FakeDistribution]:
    return [
        FakeDistribution("alpha-plugins", "1.0", FakeEntryPoint("plugins", hooks_module(Halver, Doubler))),
        FakeDistribution("beta-plugins", "2.0", FakeEntryPoint("plugins", hooks_module(OtherHalver))),
    ]


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
