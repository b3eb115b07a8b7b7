"""Plugin discovery: entry points of the group ``balancer``, loaded lazily, once, one at a time.

Every package (this one included: the built-in plugins come in through the same entry point
group) exposes a module or object implementing :func:`balancer.hookspecs.balancer_register_plugins`.
A package that fails to load is reported with a :class:`~balancer.errors.PluginWarning` naming
its distribution and the others keep working; ``BALANCER_STRICT_PLUGINS=1`` turns the warning
into a :class:`~balancer.errors.PluginLoadError`. ``BALANCER_DISABLE_PLUGIN_AUTOLOAD=1`` skips the
entry points of every distribution but this one, so only the built-ins and plugins passed as
classes or instances are available.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import warnings
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginLoadError, PluginWarning
from .plugin import Plugin, PluginOptions

__all__ = ["PluginInfo", "Registry", "default_registry", "list_plugins"]

ENTRY_POINT_GROUP = "balancer"
OWN_DISTRIBUTION = "gradient-balancer"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _normalize(dist_name: str) -> str:
    """PEP 503 normalized distribution name: `Gradient_Balancer` and `gradient-balancer` are the same."""
    return re.sub(r"[-_.]+", "-", dist_name).lower()


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
        self._commit(self._collect_from_classes([plugin_class], distribution, version))

    def unregister(self, name: str) -> None:
        self._plugins.pop(name, None)

    def register_hooks(self, obj: object, *, distribution: str = "<local>", version: str = "") -> None:
        """Registers a module or object that implements ``balancer_register_plugins``."""
        self.load()
        self._commit(self._collect_from_hooks(obj, f"{distribution}:{id(obj)}", distribution, version))

    def _collect_from_classes(self, classes: list[Any], distribution: str, version: str) -> dict[str, PluginInfo]:
        found: dict[str, PluginInfo] = {}
        for obj in classes:
            cls = _check_plugin_class(obj)
            if cls.name in found or cls.name in self._plugins:
                owner = found.get(cls.name) or self._plugins[cls.name]
                raise PluginLoadError(
                    f"Plugin name `{cls.name}` from `{distribution}` is already registered by "
                    f"`{owner.distribution}`. Rename one of them."
                )
            found[cls.name] = PluginInfo(cls.name, distribution, version, cls.summary(), cls)
        return found

    def _collect_from_hooks(self, obj: object, pm_name: str, distribution: str, version: str) -> dict[str, PluginInfo]:
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
            return self._collect_from_classes(classes, distribution, version)
        except BaseException:
            self._pm.unregister(obj)
            raise

    def _commit(self, found: dict[str, PluginInfo]) -> None:
        self._plugins.update(found)

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
            seen: set[str] = set()
            for dist in importlib.metadata.distributions():
                dist_name = dist.metadata["Name"] or "<unknown>"
                key = _normalize(dist_name)
                if key in seen:
                    continue
                seen.add(key)
                if own_only and key != OWN_DISTRIBUTION:
                    continue
                for ep in dist.entry_points:
                    if ep.group == ENTRY_POINT_GROUP and (key, ep.name) not in self._attempted:
                        self._load_entry_point(ep, dist_name, dist.version, strict)
                        self._attempted.add((key, ep.name))
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint, dist_name: str, version: str, strict: bool) -> None:
        try:
            obj = ep.load()
            self._commit(self._collect_from_hooks(obj, f"{dist_name}:{ep.name}", dist_name, version))
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
