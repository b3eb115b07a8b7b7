"""Configuration: pydantic models, and turning specs into plugin instances.

A config lives on its own or as the ``"balancer"`` section of a DeepSpeed config::

    {"balancer": {"plugins": [{"name": "task_norm", "options": {"alpha": 1.0}}, "pcgrad"]}}

Each plugin validates its own ``options`` with its own frozen model (unknown keys are errors).
Every problem found is reported together in one :class:`~balancer.errors.ConfigError`, each with
the path of the bad field.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetJsonSchemaHandler, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .errors import ConfigError, PluginLoadError
from .plugin import Plugin
from .registry import Registry, default_registry

__all__ = ["BalancerConfig", "PluginSpec", "build_plugins", "config_schema", "load_config", "resolve_config"]

NonFinitePolicy = Literal["zero", "raise"]


class PluginSpec(BaseModel):
    """One entry of the plugin list: a registry name and that plugin's options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Registry name of the plugin, e.g. `task_norm`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Validated by the plugin's own model.")


def _bare_name(item: Any) -> Any:
    return {"name": item} if isinstance(item, str) else item


class _OrBareName:
    """JSON schema of a plugin entry: a :class:`PluginSpec` object or a bare name (default options)."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        bare = {"type": "string", "minLength": 1, "description": "A registry name, with default options."}
        return {"anyOf": [handler(schema), bare]}


PluginEntry = Annotated[PluginSpec, BeforeValidator(_bare_name), _OrBareName()]


class BalancerConfig(BaseModel):
    """The ``balancer`` section of a config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plugins: list[PluginEntry] = Field(
        default_factory=list, description="Plugins applied in this order; a bare name means default options."
    )
    on_nonfinite: NonFinitePolicy = Field(
        "zero",
        description="A group gradient with NaN/inf: `zero` gives it weight 0 for the step (with a warning), "
        "`raise` refuses the step.",
    )


def _loc(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts)


def _errors_of(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        path = _loc(err["loc"])
        message = err["msg"] if err["type"] == "missing" else f"{err['msg']}; found {reprlib.repr(err['input'])}"
        out.append((f"{prefix}.{path}" if prefix and path else prefix or path, message))
    return out


def _read_section(source: Mapping[str, Any] | str | Path) -> tuple[Any, str]:
    """The raw ``balancer`` section of a dict or JSON file, and the path prefix of its fields."""
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError([("", f"config file `{path}` does not exist")]) from None
        except OSError as exc:
            raise ConfigError([("", f"config file `{path}` cannot be read: {exc}")]) from None
        except json.JSONDecodeError as exc:
            raise ConfigError([("", f"config file `{path}` is not valid JSON: {exc}")]) from None
        return _read_section(data)
    if not isinstance(source, Mapping):
        raise ConfigError([("", f"expected a dict, a JSON path or a BalancerConfig, found `{type(source).__name__}`")])
    if "balancer" in source:
        return source["balancer"], "balancer"
    return source, ""


def load_config(source: BalancerConfig | Mapping[str, Any] | str | Path) -> BalancerConfig:
    """Reads a config from a model, a dict or a JSON file.

    A dict (or file) with a top-level ``"balancer"`` key, such as a DeepSpeed config, is read
    from that section; anything else must be the section itself.
    """
    if isinstance(source, BalancerConfig):
        return source
    section, prefix = _read_section(source)
    try:
        return BalancerConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(_errors_of(exc, prefix)) from None


def resolve_config(
    source: BalancerConfig | Mapping[str, Any] | str | Path, registry: Registry | None = None
) -> tuple[BalancerConfig, list[Plugin]]:
    """Reads a config and builds its plugins, reporting structural and plugin errors together."""
    if isinstance(source, BalancerConfig):
        return source, build_plugins([(s.name, s.options) for s in source.plugins], registry)
    section, prefix = _read_section(source)
    errors: list[tuple[str, str]] = []
    config = None
    try:
        config = BalancerConfig.model_validate(section)
    except ValidationError as exc:
        errors.extend(_errors_of(exc, prefix))
    entries = section.get("plugins") if isinstance(section, Mapping) else None
    plugins: list[Plugin] = []
    if isinstance(entries, list):
        try:
            plugins = build_plugins(entries, registry, prefix=f"{prefix}." if prefix else "")
        except ConfigError as exc:
            errors.extend(e for e in exc.errors if e not in errors)
    if errors or config is None:
        raise ConfigError(errors)
    return config, plugins


def _spec_of(entry: Any) -> PluginSpec | Plugin | type[Plugin]:
    if isinstance(entry, Plugin | PluginSpec):
        return entry
    if isinstance(entry, type) and issubclass(entry, Plugin):
        return entry
    if isinstance(entry, str):
        return PluginSpec(name=entry)
    if isinstance(entry, tuple) and len(entry) == 2:
        name, options = entry
        return PluginSpec(name=name, options=dict(options) if isinstance(options, BaseModel) else options or {})
    if isinstance(entry, Mapping):
        return PluginSpec.model_validate(entry)
    raise TypeError(
        "a plugin entry must be a name, a (name, options) pair, a {'name', 'options'} dict, "
        f"a Plugin class or a Plugin instance; found `{entry!r}`"
    )


def build_plugins(entries: Iterable[Any], registry: Registry | None = None, *, prefix: str = "") -> list[Plugin]:
    """Turns plugin entries into instances, validating every entry and reporting all errors together."""
    registry = registry or default_registry
    plugins: list[Plugin] = []
    errors: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        where = f"{prefix}plugins.{i}"
        try:
            spec = _spec_of(entry)
        except (TypeError, ValidationError) as exc:
            errors.extend(_errors_of(exc, where) if isinstance(exc, ValidationError) else [(where, str(exc))])
            continue
        if isinstance(spec, Plugin):
            plugins.append(spec)
            continue
        if isinstance(spec, type):
            try:
                plugins.append(spec())
            except ValidationError as exc:
                errors.extend(_errors_of(exc, f"{where}.options"))
            continue
        try:
            info = registry.get(spec.name)
        except PluginLoadError as exc:
            errors.append((f"{where}.name", str(exc)))
            continue
        try:
            plugins.append(info.plugin_class(spec.options))
        except ValidationError as exc:
            errors.extend(_errors_of(exc, f"{where}.options"))
    names = [p.name for p in plugins]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        errors.append(
            (f"{prefix}plugins", f"plugin names must be unique (state is keyed by name); repeated: {duplicates}")
        )
    if errors:
        raise ConfigError(errors)
    return plugins


def config_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON schema of the config, with each available plugin's options schema under ``plugin_options``."""
    registry = registry or default_registry
    schema = BalancerConfig.model_json_schema()
    schema["plugin_options"] = {info.name: info.options_model.model_json_schema() for info in registry.list()}
    return schema
