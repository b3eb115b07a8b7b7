"""Configuration: pydantic models, and turning specs into plugin instances.

A config lives on its own or as the ``"balancer"`` section of a DeepSpeed config::

    {"balancer": {"plugins": [{"name": "task_norm", "options": {"alpha": 1.0}}, "pcgrad"]}}

``plugins`` may also be a mapping of plugin name -> options (``null`` or ``{}`` for the defaults),
applied in the order written: ``{"plugins": {"task_norm": {"alpha": 0.5}, "pcgrad": null}}``.
Each plugin validates its own ``options`` with its own frozen model (unknown keys are errors).
Every problem found is reported once, together with the others, in one
:class:`~balancer.errors.ConfigError`, each with the path of the bad field.

The entries of a plugin list are checked and built in ``balancer._plugin_entries``; JSON config
files are read by ``balancer._config_file``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

from balancer._config_file import read_json_file
from balancer._plugin_entries import PluginSpec, bare_name, check_entries, errors_of, list_problem
from balancer.contract.plugin import Plugin
from balancer.contract.registry import Registry, default_registry
from balancer.errors import ConfigError

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


class _OrBareName:
    """JSON schema of a plugin entry: a :class:`PluginSpec` object or a bare name (default options)."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        bare = {"type": "string", "minLength": 1, "description": "A registry name, with default options."}
        return {"anyOf": [handler(schema), bare]}


def _entry_list(value: Any) -> Any:
    """The ``plugins`` field as a list: a mapping of name -> options becomes specs in its order."""
    if problem := list_problem(value, python=True):
        raise PydanticCustomError("plugin_list", "{problem}", {"problem": problem})
    return list(value.items()) if isinstance(value, Mapping) else value


class _OrMapping:
    """JSON schema of the plugin list: a list of entries, or a mapping of plugin name -> options (or null)."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        options = {"anyOf": [{"type": "object"}, {"type": "null"}], "description": "Options; null for the defaults."}
        mapping = {"type": "object", "propertyNames": {"minLength": 1}, "additionalProperties": options}
        return {"anyOf": [handler(schema), mapping]}


PluginEntry = Annotated[PluginSpec, BeforeValidator(bare_name), _OrBareName()]
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


def _read_section(source: Mapping[str, Any] | str | Path) -> tuple[Any, str]:
    """The raw ``balancer`` section of a dict or JSON file, and the path prefix of its fields."""
    if isinstance(source, str | Path):
        source = read_json_file(Path(source))  # a file holding a string is not read as a path in turn
    if not isinstance(source, Mapping):
        raise ConfigError([("", f"expected a dict, a JSON path or a BalancerConfig, found `{type(source).__name__}`")])
    section, prefix = (source["balancer"], "balancer") if "balancer" in source else (source, "")
    return (section.model_dump() if isinstance(section, BalancerConfig) else section), prefix


def _validate(source: Mapping[str, Any] | str | Path, registry: Registry | None) -> tuple[BalancerConfig, list[Plugin]]:
    """The config in ``source`` and, given a registry, its plugins; the ``plugins`` field is checked here only."""
    section, prefix = _read_section(source)
    if not isinstance(section, Mapping):
        try:
            BalancerConfig.model_validate(section)  # fails: pydantic names the type found
        except ValidationError as exc:
            raise ConfigError(errors_of(exc, prefix)) from None
    where = f"{prefix}.plugins" if prefix else "plugins"
    specs, plugins, problems = check_entries(section.get("plugins", []), where, registry, python=False)
    try:
        rest = BalancerConfig.model_validate({k: v for k, v in section.items() if k != "plugins"})
    except ValidationError as exc:
        problems.extend(errors_of(exc, prefix))
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
    _, plugins, problems = check_entries(entries, f"{prefix}plugins", registry or default_registry, python=True)
    if problems:
        raise ConfigError(problems)
    return plugins


def config_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON schema of the config, with each available plugin's options schema under ``plugin_options``."""
    registry = registry or default_registry
    schema = BalancerConfig.model_json_schema()
    schema["plugin_options"] = {info.name: info.options_model.model_json_schema() for info in registry.list()}
    return schema
