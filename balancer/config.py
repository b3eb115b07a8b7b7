"""Configuration: pydantic models, and turning specs into plugin instances.

A config lives on its own or as the ``"balancer"`` section of a DeepSpeed config::

    {"balancer": {"plugins": [{"name": "task_norm", "options": {"alpha": 1.0}}, "pcgrad"]}}

``plugins`` may also be a mapping of plugin name -> options (``null`` or ``{}`` for the defaults),
applied in the order written: ``{"plugins": {"task_norm": {"alpha": 0.5}, "pcgrad": null}}``.
Each plugin validates its own ``options`` with its own frozen model (unknown keys are errors).
Every problem found is reported once, together with the others, in one
:class:`~balancer.errors.ConfigError`, each with the path of the bad field.
"""

from __future__ import annotations

import json
import reprlib
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from balancer.contract.plugin import Plugin
from balancer.contract.registry import Registry, default_registry
from balancer.errors import ConfigError, PluginLoadError

__all__ = [
    "BalancerConfig",
    "PluginSpec",
    "build_plugins",
    "config_schema",
    "load_config",
    "read_json_file",
    "resolve_config",
]

NonFinitePolicy = Literal["zero", "raise"]
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


def _bare_name(item: Any) -> Any:
    """A bare name or a ``(name, options)`` pair as a spec dict (options None: the defaults); anything else as is."""
    if isinstance(item, tuple) and len(item) == 2:
        return {"name": item[0], "options": {} if item[1] is None else item[1]}
    return {"name": item} if isinstance(item, str) else item


class _OrBareName:
    """JSON schema of a plugin entry: a :class:`PluginSpec` object or a bare name (default options)."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        bare = {"type": "string", "minLength": 1, "description": "A registry name, with default options."}
        return {"anyOf": [handler(schema), bare]}


def _list_problem(value: Any, python: bool) -> str | None:
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


def _entry_list(value: Any) -> Any:
    """The ``plugins`` field as a list: a mapping of name -> options becomes specs in its order."""
    if problem := _list_problem(value, python=True):
        raise PydanticCustomError("plugin_list", "{problem}", {"problem": problem})
    return list(value.items()) if isinstance(value, Mapping) else value


class _OrMapping:
    """JSON schema of the plugin list: a list of entries, or a mapping of plugin name -> options (or null)."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        options = {"anyOf": [{"type": "object"}, {"type": "null"}], "description": "Options; null for the defaults."}
        mapping = {"type": "object", "propertyNames": {"minLength": 1}, "additionalProperties": options}
        return {"anyOf": [handler(schema), mapping]}


PluginEntry = Annotated[PluginSpec, BeforeValidator(_bare_name), _OrBareName()]
PluginList = Annotated[list[PluginEntry], BeforeValidator(_entry_list), _OrMapping()]


class BalancerConfig(BaseModel):
    """The ``balancer`` section of a config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plugins: PluginList = Field(
        default_factory=list,
        description="Plugins applied in this order; a bare name means default options. "
        "Also a mapping of plugin name -> options, in the order written.",
    )
    on_nonfinite: NonFinitePolicy = Field(
        "zero",
        description="A group gradient with NaN/inf: `zero` gives it weight 0 for the step (with a warning), "
        "`raise` refuses the step.",
    )
    max_grad_norm: float | None = Field(
        None,
        ge=0,
        description="Clip the balanced update (ungrouped + weighted groups) to this total norm at every step, as "
        "torch.nn.utils.clip_grad_norm_ does; null: no clipping. With DeepSpeed, use either this or its "
        "`gradient_clipping`, not both.",
    )
    norm_type: Annotated[float, Field(gt=0)] | Literal["inf"] = Field(
        2.0, description='The norm of `max_grad_norm`: 2.0 (Euclidean), any p > 0, or "inf".'
    )

    @model_validator(mode="after")
    def _norm_type_needs_max_grad_norm(self) -> BalancerConfig:
        if self.max_grad_norm is None and self.norm_type != 2.0:
            raise ValueError(f"norm_type = {self.norm_type!r} without max_grad_norm would be ignored; set both")
        return self

    def balancer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Balancer`` this config sets, besides the plugins."""
        return {"on_nonfinite": self.on_nonfinite, "max_grad_norm": self.max_grad_norm, "norm_type": self.norm_type}


def _errors_of(exc: ValidationError, prefix: str = "", keyed: bool = False) -> Problems:
    """The errors of ``exc`` as (path, message) under ``prefix``; ``keyed``: the errors of a mapping entry,
    whose key is the name and whose value is the options, so ``name`` and ``options`` are dropped from the path."""
    out = []
    for err in exc.errors():
        loc = err["loc"][1:] if keyed and err["loc"][:1] in (("name",), ("options",)) else err["loc"]
        path = ".".join(str(p) for p in loc)
        message = err["msg"] if err["type"] == "missing" else f"{err['msg']}; found {reprlib.repr(err['input'])}"
        out.append((f"{prefix}.{path}" if prefix and path else prefix or path, message))
    return out


def read_json_file(path: Path) -> Any:
    """The JSON value in the file at ``path``; every way it can fail is a ConfigError naming the file."""
    repeated: list[str] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        repeated.extend(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        return dict(pairs)

    def fail(problem: str) -> ConfigError:
        return ConfigError([("", f"config file `{path}` {problem}")])

    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise fail("does not exist") from None
    except OSError as exc:
        raise fail(f"cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise fail(
            f"is not JSON text: byte {exc.start} cannot be decoded as {exc.encoding}; save it as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise fail(f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise fail(
            f"nests lists or objects too deeply to read (about {sys.getrecursionlimit()} levels or more)"
        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise fail(f"is not valid JSON: {exc}") from None
    if repeated:
        found = ", ".join(f"`{key}`" for key in repeated)
        raise fail(f"repeats the key(s) {found} in one object (JSON would keep only the last); write each key once")
    return data


def _read_section(source: Mapping[str, Any] | str | Path) -> tuple[Any, str]:
    """The raw ``balancer`` section of a dict or JSON file, and the path prefix of its fields."""
    if isinstance(source, str | Path):
        source = read_json_file(Path(source))  # a file holding a string is not read as a path in turn
    if not isinstance(source, Mapping):
        raise ConfigError([("", f"expected a dict, a JSON path or a BalancerConfig, found `{type(source).__name__}`")])
    section, prefix = (source["balancer"], "balancer") if "balancer" in source else (source, "")
    return (section.model_dump() if isinstance(section, BalancerConfig) else section), prefix


def _spec_of(entry: Any, where: str, keyed: bool) -> tuple[PluginSpec | None, Any, Problems]:
    """A name, spec, spec dict or pair as a validated spec, with the options to build it from, or its problems.

    An options model (in a pair or a mapping) is kept as is for building, so a model of another plugin
    is refused rather than read field by field.
    """
    if not isinstance(entry := _bare_name(entry), PluginSpec | Mapping):
        return None, None, [(where, f"{ENTRY_FORMS}; found `{reprlib.repr(entry)}`")]
    model = entry.get("options") if isinstance(entry, Mapping) else None
    if isinstance(model, BaseModel):
        entry = {**entry, "options": dict(model)}
    try:
        spec = PluginSpec.model_validate(entry)
    except ValidationError as exc:
        return None, None, _errors_of(exc, where, keyed)
    return spec, model if isinstance(model, BaseModel) else spec.options, []


def _entry(
    entry: Any, where: str, keyed: bool, registry: Registry | None
) -> tuple[PluginSpec | None, Plugin | None, Problems]:
    """Checks one entry and, given a registry, builds it: its spec, its plugin, and every problem found once.

    An entry's structure (name, keys, options type) is checked first; its name and options once that is right.
    Plugin classes and instances are built (or taken) as they are; their spec lists their name and options.
    """
    if isinstance(entry, Plugin) or (isinstance(entry, type) and issubclass(entry, Plugin)):
        try:
            plugin = entry if isinstance(entry, Plugin) else entry()
        except ValidationError as exc:
            return None, None, _errors_of(exc, f"{where}.options")
        except TypeError as exc:  # e.g. an abstract class
            return None, None, [(where, f"the plugin class `{entry.__name__}` cannot be built: {exc}")]
        return PluginSpec.model_construct(name=plugin.name, options=plugin.options.model_dump()), plugin, []
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
        return None, None, _errors_of(exc, options_at)
    except TypeError as exc:  # an options model of another plugin
        return None, None, [(options_at, str(exc))]


def _check(
    value: Any, where: str, registry: Registry | None, python: bool
) -> tuple[list[PluginSpec], list[Plugin], Problems]:
    """Checks (and, given a registry, builds) every entry of a ``plugins`` value, reporting each problem once.

    Entries keep the user's order: a list's entries sit at ``plugins.<i>``, a mapping's items become
    ``(name, options)`` pairs at ``plugins.<name>``.
    """
    if problem := _list_problem(value, python):
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


def _validate(source: Mapping[str, Any] | str | Path, registry: Registry | None) -> tuple[BalancerConfig, list[Plugin]]:
    """The config in ``source`` and, given a registry, its plugins; the ``plugins`` field is checked here only."""
    section, prefix = _read_section(source)
    if not isinstance(section, Mapping):
        try:
            BalancerConfig.model_validate(section)  # fails: pydantic names the type found
        except ValidationError as exc:
            raise ConfigError(_errors_of(exc, prefix)) from None
    where = f"{prefix}.plugins" if prefix else "plugins"
    specs, plugins, problems = _check(section.get("plugins", []), where, registry, python=False)
    try:
        rest = BalancerConfig.model_validate({k: v for k, v in section.items() if k != "plugins"})
    except ValidationError as exc:
        problems.extend(_errors_of(exc, prefix))
    if problems:
        raise ConfigError(problems)
    return rest.model_copy(update={"plugins": specs}), plugins


def load_config(source: BalancerConfig | Mapping[str, Any] | str | Path) -> BalancerConfig:
    """Reads a config from a model, a dict or a JSON file.

    A dict (or file) with a top-level ``"balancer"`` key, such as a DeepSpeed config, is read
    from that section; anything else must be the section itself. Plugin names are not looked up
    and options are not validated here: :func:`resolve_config` does both.
    """
    if isinstance(source, BalancerConfig):
        return source
    return _validate(source, None)[0]


def resolve_config(
    source: BalancerConfig | Mapping[str, Any] | str | Path, registry: Registry | None = None
) -> tuple[BalancerConfig, list[Plugin]]:
    """Reads a config and builds its plugins, reporting structural and plugin errors together, each once.

    A dict may also hold what ``Balancer(plugins=...)`` takes: ``(name, options)`` pairs, plugin classes
    and instances; the returned config then lists their names and options.
    """
    if isinstance(source, BalancerConfig):
        return source, build_plugins([(s.name, s.options) for s in source.plugins], registry)
    return _validate(source, registry or default_registry)


def build_plugins(entries: Iterable[Any], registry: Registry | None = None, *, prefix: str = "") -> list[Plugin]:
    """Turns plugin entries into instances, validating every entry and reporting all errors together.

    ``entries`` is a list (or other ordered iterable) of names, ``(name, options)`` pairs, spec dicts,
    plugin classes and instances, or a mapping of plugin name -> options (None or ``{}`` for the
    defaults, or an options model), applied in its order. A string, a single spec or a set is refused.
    """
    _, plugins, problems = _check(entries, f"{prefix}plugins", registry or default_registry, python=True)
    if problems:
        raise ConfigError(problems)
    return plugins


def config_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON schema of the config, with each available plugin's options schema under ``plugin_options``."""
    registry = registry or default_registry
    schema = BalancerConfig.model_json_schema()
    schema["plugin_options"] = {info.name: info.options_model.model_json_schema() for info in registry.list()}
    return schema
