"""Plugin discovery: entry points of the group ``balancer``, loaded lazily, once, one at a time.

Every package (this one included: the built-in plugins come in through the same entry point
group) exposes a module or object implementing :func:`balancer.contract.hookspecs.balancer_register_plugins`.
A package that fails to load is reported with a :class:`~balancer.errors.PluginWarning` naming
its distribution and the others keep working; ``BALANCER_STRICT_PLUGINS=1`` turns the warning
into a :class:`~balancer.errors.PluginLoadError`. ``BALANCER_DISABLE_PLUGIN_AUTOLOAD=1`` skips the
entry points of every distribution but this one, so only the built-ins and plugins passed as
classes or instances are available.

Name clashes. A plugin name means one class, decided the same way whatever order
``importlib.metadata`` enumerates distributions in:

- This project's distribution is loaded first, so the built-ins always own their names. A
  third-party plugin taking a built-in's name is skipped alone (the rest of its package loads)
  with a :class:`~balancer.errors.PluginWarning` naming both distributions.
- A name provided by two or more third-party packages is ambiguous: none of them gets it, it is
  left out of :meth:`Registry.list` (and ``balancer plugins``) with a warning, and
  :meth:`Registry.get` raises a :class:`~balancer.errors.PluginLoadError` naming every provider.
  Picking one (first enumerated, or alphabetical) would silently run a plugin the user may not
  have meant.
- In both cases the plugin stays usable as a class or instance: ``Balancer(opt, plugins=[TheirPlugin()])``.
  Under ``BALANCER_STRICT_PLUGINS=1`` a clash is a ``PluginLoadError`` and nothing of that entry
  point is registered. A clash inside one distribution, or with :meth:`Registry.register` by
  hand, is always a ``PluginLoadError``.

The wording of clashes (and the advice to pass a class) is in ``balancer.contract._clashes``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import warnings
from typing import Any

import pluggy

from balancer.contract import hookspecs
from balancer.contract._clashes import OWN_DISTRIBUTION, ambiguity, clash, describe, how_to_use, normalize
from balancer.contract.plugin import Plugin, PluginOptions
from balancer.errors import PluginLoadError, PluginWarning

__all__ = ["PluginInfo", "Registry", "default_registry", "list_plugins"]

ENTRY_POINT_GROUP = "balancer"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: where it comes from and what it is."""

    name: str
    distribution: str
    version: str
    summary: str
    plugin_class: type[Plugin]

    @property
    def options_model(self) -> type[PluginOptions]:
        return self.plugin_class.Options


def _check_plugin_class(obj: Any) -> type[Plugin]:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise TypeError(f"register() takes a subclass of balancer.Plugin. Found `{obj!r}`.")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TypeError(
            f"Plugin class `{obj.__qualname__}` must set `name` to an identifier-like string. Found `name = {name!r}`."
        )
    if not (isinstance(obj.Options, type) and issubclass(obj.Options, PluginOptions)):
        raise TypeError(f"Plugin `{name}`: `Options` must subclass balancer.PluginOptions.")
    return obj


class Registry:
    """Maps plugin names to plugin classes. One instance (:data:`default_registry`) serves the
    library; tests make their own so nothing leaks between them."""

    def __init__(self) -> None:
        self._plugins: dict[str, PluginInfo] = {}
        self._ambiguous: dict[str, list[PluginInfo]] = {}  # name -> every third-party provider, sorted
        self._loaded = False
        self._loading = False
        self._attempted: set[tuple[str, str]] = set()  # (distribution, entry point) loaded or reported
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)

    # -- registration -----------------------------------------------------------------------
    def register(self, plugin_class: type[Plugin], *, distribution: str = "<local>", version: str = "") -> None:
        """Registers one plugin class by hand (tests, notebooks, plugins not packaged).

        Entry points are loaded first, so a name clash is always reported against this call.
        """
        self.load()
        self._add(self._collect_from_classes([plugin_class], distribution, version), from_package=False)

    def unregister(self, name: str) -> None:
        """Frees ``name``, whoever holds it (one plugin, or every provider of an ambiguous name)."""
        self._plugins.pop(name, None)
        self._ambiguous.pop(name, None)

    def register_hooks(self, obj: object, *, distribution: str = "<local>", version: str = "") -> None:
        """Registers a module or object that implements ``balancer_register_plugins``."""
        self.load()
        self._add_hooks(obj, f"{distribution}:{id(obj)}", distribution, version, from_package=False)

    def _collect_from_classes(self, classes: list[Any], distribution: str, version: str) -> dict[str, PluginInfo]:
        found: dict[str, PluginInfo] = {}
        for obj in classes:
            cls = _check_plugin_class(obj)
            if cls.name in found:
                raise PluginLoadError(
                    f"Plugin name `{cls.name}` from `{distribution}` is already registered by `{distribution}`. "
                    "Rename one of them."
                )
            found[cls.name] = PluginInfo(cls.name, distribution, version, cls.summary(), cls)
        return found

    def _add_hooks(
        self, obj: object, pm_name: str, distribution: str, version: str, *, from_package: bool, strict: bool = False
    ) -> list[str]:
        """Registers ``obj``'s hooks and the plugins it declares; all or nothing if anything raises.

        Returns the warnings about plugins skipped for a name clash (see :meth:`_add`).
        """
        self._pm.register(obj, name=pm_name)
        try:
            self._pm.check_pending()
            classes: list[Any] = []
            hook_args = {"register": classes.append}
            if not self._pm.get_hookcallers(obj):
                raise PluginLoadError(
                    f"`{obj!r}` implements no balancer hook (`balancer_register_plugins` or "
                    "`balancer_make_backend`). Define one and decorate it with `@balancer.hookimpl`."
                )
            impls = [i for i in self._pm.hook.balancer_register_plugins.get_hookimpls() if i.plugin is obj]
            for impl in impls:  # pluggy lets an implementation take a subset of the arguments
                impl.function(*(hook_args[arg] for arg in impl.argnames))
            found = self._collect_from_classes(classes, distribution, version)
            return self._add(found, from_package=from_package, strict=strict)
        except BaseException:
            self._pm.unregister(obj)
            raise

    def _add(self, found: dict[str, PluginInfo], *, from_package: bool, strict: bool = False) -> list[str]:
        """Adds ``found`` under their names, following the clash rules of the module docstring.

        A clash raises (and nothing is added) for a registration by hand, a clash inside one
        distribution, or strict mode. Otherwise a plugin clashing with a built-in is skipped and
        one clashing with another package makes the name ambiguous. Returns the warnings to emit.
        """
        clashes: dict[str, tuple[str, list[PluginInfo]]] = {}
        for info in found.values():
            owners = [self._plugins[info.name]] if info.name in self._plugins else self._ambiguous.get(info.name, [])
            if not owners:
                continue
            if not from_package or any(normalize(o.distribution) == normalize(info.distribution) for o in owners):
                by = " and ".join(f"`{o.distribution}`" for o in owners)
                raise PluginLoadError(
                    f"Plugin name `{info.name}` from `{info.distribution}` is already registered by {by}. "
                    "Rename one of them."
                )
            clashes[info.name] = what, usable = clash(info, owners)
            if strict:
                raise PluginLoadError(f"{what}. {how_to_use(usable)}")
        messages = []
        for info in found.values():
            what, usable = clashes.get(info.name, ("", []))
            if not usable:
                self._plugins[info.name] = info
            elif usable == [info]:  # a built-in's name
                messages.append(
                    f"{what}, so it was skipped (the other plugins of `{info.distribution}` are loaded). "
                    f"{how_to_use(usable)} Set BALANCER_STRICT_PLUGINS=1 to make this an error."
                )
            else:  # another package's name: ambiguous from now on, warned about at the end of load()
                self._plugins.pop(info.name, None)
                self._ambiguous[info.name] = usable
        return messages

    # -- discovery --------------------------------------------------------------------------
    def load(self) -> None:
        """Loads every entry point once. Safe to call many times.

        In strict mode a failure raises, and the next call tries the failed entry point again
        (entry points already loaded are not loaded twice), so the error is never silenced.
        """
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            strict = _env_flag("BALANCER_STRICT_PLUGINS")
            own_only = _env_flag("BALANCER_DISABLE_PLUGIN_AUTOLOAD")
            dists: dict[str, importlib.metadata.Distribution] = {}  # normalized name -> first found on the path
            for dist in importlib.metadata.distributions():
                dists.setdefault(normalize(dist.metadata["Name"] or "<unknown>"), dist)
            for key, dist in sorted(dists.items(), key=lambda item: item[0] != OWN_DISTRIBUTION):  # built-ins first
                if own_only and key != OWN_DISTRIBUTION:
                    continue
                dist_name = dist.metadata["Name"] or "<unknown>"
                for ep in dist.entry_points:
                    if ep.group == ENTRY_POINT_GROUP and (key, ep.name) not in self._attempted:
                        skipped = self._load_entry_point(ep, dist_name, dist.version, strict)
                        self._attempted.add((key, ep.name))
                        for message in skipped:
                            warnings.warn(message, PluginWarning, stacklevel=3)
            for name, providers in sorted(self._ambiguous.items()):
                warnings.warn(
                    f"{ambiguity(name, providers)}; the name is ambiguous, so it is left out and asking for "
                    f"it by name is an error (the other plugins of these packages are loaded). "
                    f"{how_to_use(providers)} Set BALANCER_STRICT_PLUGINS=1 to make this an error.",
                    PluginWarning,
                    stacklevel=3,
                )
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_point(
        self, ep: importlib.metadata.EntryPoint, dist_name: str, version: str, strict: bool
    ) -> list[str]:
        """Loads one entry point; returns the warnings about plugins skipped for a name clash."""
        try:
            obj = ep.load()
            return self._add_hooks(obj, f"{dist_name}:{ep.name}", dist_name, version, from_package=True, strict=strict)
        except Exception as exc:
            message = (
                f"Could not load balancer plugins from distribution `{dist_name}` {version} "
                f"(entry point `{ep.name} = {ep.value}`): {type(exc).__name__}: {str(exc).rstrip('.')}."
            )
            if strict:
                raise PluginLoadError(
                    f"{message} Fix or uninstall that package, or unset BALANCER_STRICT_PLUGINS to only warn."
                ) from exc
            warnings.warn(
                f"{message} Plugins from other packages are unaffected; "
                "set BALANCER_STRICT_PLUGINS=1 to make this an error.",
                PluginWarning,
                stacklevel=4,
            )
            return []

    def make_backend(self, target: Any) -> Any:
        """Asks the integrations for a backend for ``target``; ``None`` if none claims it."""
        self.load()
        return self._pm.hook.balancer_make_backend(target=target)

    # -- lookup -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.load()
        return sorted(self._plugins)

    def list(self) -> list[PluginInfo]:
        self.load()
        return [self._plugins[name] for name in sorted(self._plugins)]

    def get(self, name: str) -> PluginInfo:
        self.load()
        if name in self._ambiguous:
            providers = self._ambiguous[name]
            raise PluginLoadError(
                f"Plugin name `{name}` is ambiguous: it is provided by {' and '.join(map(describe, providers))}. "
                f"{how_to_use(providers)} Or uninstall all but one of these packages."
            )
        try:
            return self._plugins[name]
        except KeyError:
            available = ", ".join(self.names()) or "none"
            raise PluginLoadError(
                f"Unknown plugin `{name}`. Available plugins: {available}. "
                "Install the package that provides it, or pass the plugin class or instance directly."
            ) from None


default_registry = Registry()


def list_plugins() -> list[PluginInfo]:
    """Every plugin available by name: name, distribution, version and one-line summary."""
    return default_registry.list()
