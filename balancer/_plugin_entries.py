"""The entries of a ``plugins`` list: the spec model of one entry, and checking and building them.

What :mod:`balancer.config` and ``Balancer(plugins=...)`` accept as an entry: a registry name, a
``(name, options)`` pair, a ``{"name", "options"}`` dict or :class:`PluginSpec`, a plugin class
or a plugin instance; a list of entries, or a mapping of plugin name -> options. Each problem is
reported once, as ``(path, message)``, so that :class:`~balancer.errors.ConfigError` lists them all.
"""

from __future__ import annotations

import json
import reprlib
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from balancer.contract.plugin import Plugin
from balancer.contract.registry import Registry
from balancer.errors import PluginLoadError

__all__ = ["ENTRY_FORMS", "PluginSpec", "Problems", "bare_name", "check_entries", "errors_of", "list_problem"]

Problems = list[tuple[str, str]]

ENTRY_FORMS = (
    "a plugin entry must be a name, a (name, options) pair, a {'name', 'options'} dict, "
    "a Plugin class or a Plugin instance"
)


class PluginSpec(BaseModel):
    """One entry of the plugin list: a registry name and that plugin's options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Registry name of the plugin, e.g. `task_norm`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Validated by the plugin's own model.")


def bare_name(item: Any) -> Any:
    """A bare name or a ``(name, options)`` pair as a spec dict (options None: the defaults); anything else as is."""
    if isinstance(item, tuple) and len(item) == 2:
        return {"name": item[0], "options": {} if item[1] is None else item[1]}
    return {"name": item} if isinstance(item, str) else item


def list_problem(value: Any, python: bool) -> str | None:
    """Why ``value`` is neither a list of plugin entries nor a mapping of name -> options (with the fix), or None.

    A string would be read letter by letter, a single spec as plugins named ``name`` and ``options``
    and a set in no defined order: each is refused instead, with the list form to write.
    """
    lead, found = ("plugins=" if python else '"plugins": '), reprlib.repr(value)
    expected = "expected a list of plugins or a mapping of plugin name -> options"
    if isinstance(value, str):
        return f"expected a list of plugins, found the single string {found}; write {lead}{json.dumps([value])}"
    if isinstance(value, PluginSpec) or (isinstance(value, Mapping) and value and set(value) <= {"name", "options"}):
        name = value.name if isinstance(value, PluginSpec) else value.get("name")
        shown = json.dumps(name) if isinstance(name, str) else '"..."'
        spec = f'[{{"name": {shown}, "options": ...}}]'
        return f"{expected}, found one plugin spec {found}; put it in a list: {lead}{spec}"
    if isinstance(value, bytes | AbstractSet | BaseModel) or not isinstance(value, Iterable):
        unordered = " (a set has no order; plugins run in the order given)" if isinstance(value, AbstractSet) else ""
        return f'{expected}, found {found} of type `{type(value).__name__}`{unordered}; write e.g. {lead}["task_norm"]'
    return None


def errors_of(exc: ValidationError, prefix: str = "", keyed: bool = False) -> Problems:
    """The errors of ``exc`` as (path, message) under ``prefix``; ``keyed``: the errors of a mapping entry,
    whose key is the name and whose value is the options, so ``name`` and ``options`` are dropped from the path."""
    out = []
    for err in exc.errors():
        loc = err["loc"][1:] if keyed and err["loc"][:1] in (("name",), ("options",)) else err["loc"]
        path = ".".join(str(p) for p in loc)
        message = err["msg"] if err["type"] == "missing" else f"{err['msg']}; found {reprlib.repr(err['input'])}"
        out.append((f"{prefix}.{path}" if prefix and path else prefix or path, message))
    return out


def _spec_of(entry: Any, where: str, keyed: bool) -> tuple[PluginSpec | None, Any, Problems]:
    """A name, spec, spec dict or pair as a validated spec, with the options to build it from, or its problems.

    An options model (in a pair or a mapping) is kept as is for building, so a model of another plugin
    is refused rather than read field by field.
    """
    if not isinstance(entry := bare_name(entry), PluginSpec | Mapping):
        return None, None, [(where, f"{ENTRY_FORMS}; found `{reprlib.repr(entry)}`")]
    model = entry.get("options") if isinstance(entry, Mapping) else None
    if isinstance(entry, Mapping) and isinstance(model, BaseModel):
        entry = {**entry, "options": dict(model)}
    try:
        spec = PluginSpec.model_validate(entry)
    except ValidationError as exc:
        return None, None, errors_of(exc, where, keyed)
    return spec, model if isinstance(model, BaseModel) else spec.options, []


def _entry(
    entry: Any, where: str, keyed: bool, registry: Registry | None
) -> tuple[PluginSpec | None, Plugin | None, Problems]:
    """Checks one entry and, given a registry, builds it: its spec, its plugin, and every problem found once.

    An entry's structure (name, keys, options type) is checked first; its name and options once that is right.
    Plugin classes and instances are built (or taken) as they are; their spec lists their name and options.
    """
    if isinstance(entry, type) and issubclass(entry, Plugin):
        try:
            entry = entry()
        except ValidationError as exc:
            return None, None, errors_of(exc, f"{where}.options")
        except TypeError as exc:  # e.g. an abstract class
            return None, None, [(where, f"the plugin class `{entry.__name__}` cannot be built: {exc}")]
    if isinstance(entry, Plugin):
        return PluginSpec.model_construct(name=entry.name, options=entry.options.model_dump()), entry, []
    spec, options, problems = _spec_of(entry, where, keyed)
    if spec is None or registry is None:
        return spec, None, problems
    name_at, options_at = (where, where) if keyed else (f"{where}.name", f"{where}.options")
    try:
        info = registry.get(spec.name)
    except PluginLoadError as exc:
        return None, None, [(name_at, str(exc))]
    try:
        return spec, info.plugin_class(options), []
    except ValidationError as exc:
        return None, None, errors_of(exc, options_at)
    except TypeError as exc:  # an options model of another plugin
        return None, None, [(options_at, str(exc))]


def check_entries(
    value: Any, where: str, registry: Registry | None, python: bool
) -> tuple[list[PluginSpec], list[Plugin], Problems]:
    """Checks (and, given a registry, builds) every entry of a ``plugins`` value, reporting each problem once.

    Entries keep the user's order: a list's entries sit at ``plugins.<i>``, a mapping's items become
    ``(name, options)`` pairs at ``plugins.<name>``.
    """
    if problem := list_problem(value, python):
        return [], [], [(where, problem)]
    keyed = isinstance(value, Mapping)
    items = (
        [(item, f"{where}.{item[0]}") for item in value.items()]
        if keyed
        else [(e, f"{where}.{i}") for i, e in enumerate(value)]
    )
    specs: list[PluginSpec] = []
    plugins: list[Plugin] = []
    problems: Problems = []
    for entry, at in items:
        spec, plugin, found = _entry(entry, at, keyed, registry)
        problems += found
        specs += [spec] if spec is not None else []
        plugins += [plugin] if plugin is not None else []
    names = [p.name for p in plugins]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        problems.append((where, f"plugin names must be unique (state is keyed by name); repeated: {duplicates}"))
    return specs, plugins, problems
