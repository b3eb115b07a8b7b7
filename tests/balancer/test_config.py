"""Config: reading dicts, JSON files, DeepSpeed configs and models; every error reported at once
with its path; frozen options models; ``Balancer.from_config``; the JSON schema."""

from __future__ import annotations

import codecs
import json
import math
import reprlib
import sys

import pydantic
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import balancer
from balancer import Balancer, BalancerConfig, ConfigError, PluginSpec, Registry, build_plugins, load_config
from balancer.plugins import BUILTIN_PLUGINS, PCGradOptions, TaskNorm, TaskNormOptions

ENTRY_FORMS = (
    "a plugin entry must be a name, a (name, options) pair, a {'name', 'options'} dict, "
    "a Plugin class or a Plugin instance"
)
UNKNOWN_NOPE = (
    f"Unknown plugin `nope`. Available plugins: {', '.join(sorted(p.name for p in BUILTIN_PLUGINS))}. "
    "Install the package that provides it, or pass the plugin class or instance directly."
)
SECTION = {"plugins": [{"name": "task_norm", "options": {"alpha": 0.25}}, "other"], "on_nonfinite": "raise"}
EXPECTED = BalancerConfig(
    plugins=[PluginSpec(name="task_norm", options={"alpha": 0.25}), PluginSpec(name="other")], on_nonfinite="raise"
)

BUILTINS = sorted(plugin.name for plugin in BUILTIN_PLUGINS)


def _has_defaults(options: type[pydantic.BaseModel]) -> bool:
    try:
        options()
    except pydantic.ValidationError:
        return False
    return True


#: The built-ins that take no required option (pcd needs its primary group, constant its weights).
WITH_DEFAULTS = sorted(plugin.name for plugin in BUILTIN_PLUGINS if _has_defaults(plugin.Options))


@pytest.fixture(scope="module")
def registry() -> Registry:
    """A registry of its own, loaded from this environment (only the built-ins are installed)."""
    registry = Registry()
    assert registry.names() == BUILTINS
    return registry


def sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def errors_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[tuple[str, str]]:
    return excinfo.value.errors


# -- reading ------------------------------------------------------------------------------------
def test_load_config_from_a_dict() -> None:
    assert load_config(SECTION) == EXPECTED


def test_load_config_defaults() -> None:
    config = load_config({})

    assert config == BalancerConfig(plugins=[], on_nonfinite="zero")


def test_bare_names_become_specs_with_default_options() -> None:
    config = load_config({"plugins": ["task_norm", "pcgrad"]})

    assert config.plugins == [PluginSpec(name="task_norm", options={}), PluginSpec(name="pcgrad", options={})]
    assert BalancerConfig(plugins=["task_norm"]).plugins == [PluginSpec(name="task_norm")]


@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_load_config_from_a_json_file(tmp_path, as_str) -> None:
    path = tmp_path / "balancer.json"
    path.write_text(json.dumps(SECTION))

    assert load_config(str(path) if as_str else path) == EXPECTED


def test_load_config_from_a_deepspeed_config_reads_the_balancer_section(tmp_path) -> None:
    deepspeed = {
        "train_batch_size": 32,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "balancer": SECTION,
    }
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(deepspeed))

    assert load_config(deepspeed) == EXPECTED
    assert load_config(path) == EXPECTED


def test_load_config_returns_a_balancer_config_as_is() -> None:
    assert load_config(EXPECTED) is EXPECTED


# -- structural errors --------------------------------------------------------------------------
def test_unknown_top_level_key_is_an_error_with_its_path() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config({"plugins": [], "bogus": 1})

    assert errors_of(excinfo) == [("bogus", "Extra inputs are not permitted; found 1")]
    assert str(excinfo.value) == (
        "Invalid balancer configuration (1 error):\n  - bogus: Extra inputs are not permitted; found 1"
    )


def test_errors_in_a_deepspeed_section_carry_the_section_prefix() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config({"train_batch_size": 8, "balancer": {"plugins": [{"options": {}}], "on_nonfinite": "ignore"}})

    assert errors_of(excinfo) == [
        ("balancer.plugins.0.name", "Field required"),
        ("balancer.on_nonfinite", "Input should be 'zero' or 'raise'; found 'ignore'"),
    ]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"plugins": "task_norm"},
            [
                (
                    "plugins",
                    "expected a list of plugins, found the single string 'task_norm'; "
                    """write "plugins": ["task_norm"]""",
                )
            ],
        ),
        ({"plugins": [""]}, [("plugins.0.name", "String should have at least 1 character; found ''")]),
        (
            {"plugins": [5]},
            [("plugins.0", f"{ENTRY_FORMS}; found `5`")],
        ),
        (
            {"plugins": [{"name": "task_norm", "option": {}}]},
            [("plugins.0.option", "Extra inputs are not permitted; found {}")],
        ),
        ({"balancer": 3}, [("balancer", "Input should be a valid dictionary or instance of BalancerConfig; found 3")]),
    ],
    ids=["plugins-a-string", "empty-name", "entry-not-a-dict", "misspelt-options", "section-not-a-dict"],
)
def test_structural_errors_name_the_path_and_the_value_found(config, expected) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(config)

    assert errors_of(excinfo) == expected


def test_missing_file_is_a_config_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)

    assert errors_of(excinfo) == [("", f"config file `{path}` does not exist")]
    assert str(excinfo.value).splitlines() == [
        "Invalid balancer configuration (1 error):",
        f"  - <root>: config file `{path}` does not exist",
    ]


def test_invalid_json_is_a_config_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"plugins": [}')

    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path))

    [(where, message)] = errors_of(excinfo)
    assert where == ""
    assert message == f"config file `{path}` is not valid JSON: Expecting value: line 1 column 14 (char 13)"


def test_a_directory_is_a_config_error_naming_it(tmp_path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path)

    [(where, message)] = errors_of(excinfo)
    assert where == ""
    assert message.startswith(f"config file `{tmp_path}` cannot be read: ")


@pytest.mark.parametrize(("source", "found"), [(42, "int"), ([{"name": "task_norm"}], "list"), (None, "NoneType")])
def test_a_source_of_the_wrong_type_is_a_config_error(source, found) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(source)

    assert errors_of(excinfo) == [("", f"expected a dict, a JSON path or a BalancerConfig, found `{found}`")]


def test_a_json_file_holding_a_string_is_not_read_as_a_path(tmp_path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps(SECTION))
    path = tmp_path / "string.json"
    path.write_text(json.dumps(str(other)))

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)

    assert errors_of(excinfo) == [("", "expected a dict, a JSON path or a BalancerConfig, found `str`")]


def test_a_json_file_holding_a_list_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "list.json"
    path.write_text('["task_norm"]')

    with pytest.raises(ConfigError, match="expected a dict, a JSON path or a BalancerConfig, found `list`"):
        load_config(path)


# -- plugins and their options ------------------------------------------------------------------
def test_every_plugin_error_is_reported_together_with_its_path(registry) -> None:
    config = {
        "plugins": [
            "nope",
            {"name": "task_norm", "options": {"alpha": "x"}},
            {"name": "task_norm", "options": {"alpha": 2}},
            {"name": "task_norm", "options": {"bogus": 1}},
        ]
    }

    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), config, registry=registry)

    assert errors_of(excinfo) == [
        ("plugins.0.name", UNKNOWN_NOPE),
        ("plugins.1.options.alpha", "Input should be a valid number, unable to parse string as a number; found 'x'"),
        ("plugins.2.options.alpha", "Input should be less than or equal to 1; found 2"),
        ("plugins.3.options.bogus", "Extra inputs are not permitted; found 1"),
    ]
    assert str(excinfo.value).splitlines() == [
        "Invalid balancer configuration (4 errors):",
        f"  - plugins.0.name: {UNKNOWN_NOPE}",
        "  - plugins.1.options.alpha: Input should be a valid number, unable to parse string as a number; found 'x'",
        "  - plugins.2.options.alpha: Input should be less than or equal to 1; found 2",
        "  - plugins.3.options.bogus: Extra inputs are not permitted; found 1",
    ]


def test_several_bad_options_of_one_plugin_are_all_reported(registry) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_plugins([("task_norm", {"target": "median", "beta": 1.0, "eps": 0})], registry)

    assert errors_of(excinfo) == [
        ("plugins.0.options.target", "Input should be 'mean', 'max', 'min' or 'ema'; found 'median'"),
        ("plugins.0.options.beta", "Input should be less than 1; found 1.0"),
        ("plugins.0.options.eps", "Input should be greater than 0; found 0"),
    ]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            5,
            ("plugins.0", f"{ENTRY_FORMS}; found `5`"),
        ),
        (("task_norm", "alpha=1"), ("plugins.0.options", "Input should be a valid dictionary; found 'alpha=1'")),
        # falsy options are refused, not read as the defaults (only None means the defaults)
        (("task_norm", 0), ("plugins.0.options", "Input should be a valid dictionary; found 0")),
        (("task_norm", ""), ("plugins.0.options", "Input should be a valid dictionary; found ''")),
        ({"name": "task_norm", "opts": {}}, ("plugins.0.opts", "Extra inputs are not permitted; found {}")),
        (
            ("task_norm", PCGradOptions()),
            (
                "plugins.0.options",
                "Plugin `task_norm` expects options of type `TaskNormOptions`. Found `PCGradOptions`.",
            ),
        ),
    ],
    ids=["int", "options-not-a-dict", "options-zero", "options-empty-string", "misspelt-options", "options-of-another"],
)
def test_malformed_plugin_entries_are_config_errors(registry, entry, expected) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_plugins([entry], registry)

    assert errors_of(excinfo) == [expected]


def test_build_plugins_accepts_every_documented_entry_form(registry) -> None:
    instance = TaskNorm(alpha=0.1)
    entries = [
        "task_norm",
        ("task_norm", {"alpha": 0.2}),
        ("task_norm", None),
        {"name": "task_norm"},
        TaskNorm,
        instance,
    ]

    built = [build_plugins([entry], registry)[0] for entry in entries]

    assert all(isinstance(plugin, TaskNorm) for plugin in built)
    assert [plugin.options.alpha for plugin in built] == [1.0, 0.2, 1.0, 1.0, 1.0, 0.1]
    assert built[-1] is instance


def test_a_pair_may_carry_an_options_model(registry) -> None:
    [plugin] = build_plugins([("task_norm", TaskNormOptions(alpha=0.5, target="max"))], registry)

    assert plugin.options == TaskNormOptions(alpha=0.5, target="max")


def test_duplicate_plugin_names_are_refused(registry) -> None:
    duplicate = ("plugins", "plugin names must be unique (state is keyed by name); repeated: ['task_norm']")

    with pytest.raises(ConfigError) as excinfo:
        build_plugins(["task_norm", ("task_norm", {"alpha": 0.5})], registry)
    assert errors_of(excinfo) == [duplicate]

    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), {"plugins": ["task_norm", TaskNorm.name]}, registry=registry)
    assert errors_of(excinfo) == [duplicate]

    with pytest.raises(ConfigError) as excinfo:
        Balancer(sgd(), plugins=[TaskNorm(), "task_norm"], registry=registry)
    assert errors_of(excinfo) == [duplicate]


def test_options_models_are_frozen_and_forbid_extra_keys(registry) -> None:
    options = TaskNormOptions(alpha=0.5)

    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):
        options.alpha = 0.1
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        TaskNormOptions(alpha=0.5, alpah=0.1)
    assert options.alpha == 0.5
    for info in registry.list():
        assert info.options_model.model_config["frozen"] is True, info.name
        assert info.options_model.model_config["extra"] == "forbid", info.name


def test_config_models_are_frozen_too() -> None:
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):
        EXPECTED.on_nonfinite = "zero"
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):
        EXPECTED.plugins[0].name = "other"


@given(alpha=st.floats(min_value=0.0, max_value=1.0, exclude_min=True))  # 0 would change nothing: refused
def test_any_alpha_in_the_unit_interval_validates(registry, alpha) -> None:
    [plugin] = build_plugins([{"name": "task_norm", "options": {"alpha": alpha}}], registry)

    assert plugin.options.alpha == alpha


@given(alpha=st.floats().filter(lambda a: not 0.0 <= a <= 1.0))
def test_any_alpha_outside_the_unit_interval_is_a_config_error_at_its_path(registry, alpha) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_plugins(["task_norm", {"name": "task_norm", "options": {"alpha": alpha}}], registry)

    [(where, message)] = errors_of(excinfo)
    assert where == "plugins.1.options.alpha"
    bound = "less than or equal to 1" if alpha > 1 else "greater than or equal to 0"
    if not math.isnan(alpha):
        assert message == f"Input should be {bound}; found {alpha!r}"


@given(names=st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True), max_size=6))
def test_bare_names_and_specs_read_the_same(names) -> None:
    bare = load_config({"plugins": names})
    full = load_config({"plugins": [{"name": n, "options": {}} for n in names]})

    assert bare == full
    assert [spec.name for spec in bare.plugins] == names


# -- Balancer.from_config -----------------------------------------------------------------------
SECTION_TASK_NORM = {
    "plugins": [{"name": "task_norm", "options": {"alpha": 0.25, "target": "max"}}],
    "on_nonfinite": "raise",
}


def config_sources(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"fp16": {"enabled": False}, "balancer": SECTION_TASK_NORM}))
    return {
        "dict": SECTION_TASK_NORM,
        "deepspeed-dict": {"train_batch_size": 4, "balancer": SECTION_TASK_NORM},
        "path": path,
        "str-path": str(path),
        "model": BalancerConfig.model_validate(SECTION_TASK_NORM),
    }


@pytest.mark.parametrize("kind", ["dict", "deepspeed-dict", "path", "str-path", "model"])
def test_from_config_builds_the_plugins_with_their_options(registry, tmp_path, kind) -> None:
    inner = sgd()

    opt = Balancer.from_config(inner, config_sources(tmp_path)[kind], registry=registry)

    assert opt.inner is inner
    assert [type(p) for p in opt.plugins] == [TaskNorm]
    assert opt.plugins[0].options.alpha == 0.25
    assert opt.plugins[0].options == TaskNormOptions(alpha=0.25, target="max")
    assert opt.on_nonfinite == "raise"


def test_from_config_with_bare_names_and_defaults(registry) -> None:
    opt = Balancer.from_config(sgd(), {"plugins": ["task_norm"]}, registry=registry)

    assert opt.plugins[0].options == TaskNormOptions()
    assert opt.on_nonfinite == "zero"


def test_from_config_of_an_empty_config_has_no_plugins(registry) -> None:
    opt = Balancer.from_config(sgd(), {}, registry=registry)

    assert opt.plugins == ()


def test_from_config_reports_structural_errors(registry, tmp_path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), {"plugins": [], "bogus": 1}, registry=registry)
    assert errors_of(excinfo) == [("bogus", "Extra inputs are not permitted; found 1")]

    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), missing, registry=registry)
    assert errors_of(excinfo) == [("", f"config file `{missing}` does not exist")]


def test_config_error_is_a_value_error_and_a_balancer_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, balancer.BalancerError)


# -- schema -------------------------------------------------------------------------------------
def test_config_schema_holds_the_config_and_every_plugins_options(registry) -> None:
    schema = balancer.config_schema(registry)

    assert set(schema["properties"]) == {"plugins", "on_nonfinite", "max_grad_norm", "norm_type"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["on_nonfinite"]["enum"] == ["zero", "raise"]
    assert schema["plugin_options"] == {p.name: p.Options.model_json_schema() for p in BUILTIN_PLUGINS}
    assert schema["plugin_options"]["task_norm"] == TaskNormOptions.model_json_schema()
    alpha = schema["plugin_options"]["task_norm"]["properties"]["alpha"]
    assert (alpha["minimum"], alpha["maximum"], alpha["default"]) == (0.0, 1.0, 1.0)
    json.dumps(schema)  # serialisable as is


def test_config_schema_is_a_valid_json_schema_that_accepts_the_documented_forms(registry) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = balancer.config_schema(registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)

    validator.validate({"plugins": [{"name": "task_norm", "options": {"alpha": 1.0}}, "pcgrad"]})
    validator.validate({"plugins": [], "on_nonfinite": "raise"})
    validator.validate({"plugins": {"task_norm": {"alpha": 0.5}, "pcgrad": None, "mgda": {}}})
    assert not validator.is_valid({"plugins": "task_norm"})
    assert not validator.is_valid({"plugins": {"task_norm": 0.5}})
    assert not validator.is_valid({"plugins": {"name": "task_norm", "options": {}}})
    assert not validator.is_valid({"plugins": {"": {}}})
    assert not validator.is_valid({"plugins": [5]})
    assert not validator.is_valid({"plugins": [""]})
    assert not validator.is_valid({"plugins": [], "bogus": 1})
    assert not validator.is_valid({"on_nonfinite": "ignore"})


def test_from_config_reports_structural_and_plugin_errors_together_with_the_section_prefix(registry) -> None:
    deepspeed_style = {
        "train_batch_size": 8,
        "balancer": {"plugins": ["task_norm", {"name": "nope"}], "on_nonfinite": "never"},
    }
    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), deepspeed_style, registry=registry)
    assert errors_of(excinfo) == [  # in the order of the fields: plugins, then on_nonfinite
        ("balancer.plugins.1.name", UNKNOWN_NOPE),
        ("balancer.on_nonfinite", "Input should be 'zero' or 'raise'; found 'never'"),
    ]


# -- plugins as a mapping of name -> options ----------------------------------------------------
def test_balancer_takes_a_mapping_of_plugin_name_to_options_in_its_order(registry) -> None:
    opt = Balancer(sgd(), plugins={"task_norm": {"alpha": 0.5}, "pcgrad": None, "mgda": {}}, registry=registry)

    assert [p.name for p in opt.plugins] == ["task_norm", "pcgrad", "mgda"]
    assert opt.plugins[0].options == TaskNormOptions(alpha=0.5)


def test_a_mapping_may_carry_an_options_model(registry) -> None:
    [plugin] = build_plugins({"task_norm": TaskNormOptions(alpha=0.5, target="max")}, registry)

    assert plugin.options == TaskNormOptions(alpha=0.5, target="max")


def test_the_plugins_with_required_options_are_known() -> None:
    assert sorted(set(BUILTINS) - set(WITH_DEFAULTS)) == ["constant", "pcd"]


@given(names=st.permutations(WITH_DEFAULTS))
def test_a_mapping_keeps_the_users_order(registry, names) -> None:
    plugins = build_plugins(dict.fromkeys(names), registry)

    assert [p.name for p in plugins] == names


def test_errors_in_a_mapping_carry_the_plugin_name_as_their_path(registry) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_plugins(
            {"task_norm": {"alpha": 2, "bogus": 1}, "nope": None, "pcgrad": 3, "mgda": PCGradOptions()}, registry
        )

    assert errors_of(excinfo) == [
        ("plugins.task_norm.alpha", "Input should be less than or equal to 1; found 2"),
        ("plugins.task_norm.bogus", "Extra inputs are not permitted; found 1"),
        ("plugins.nope", UNKNOWN_NOPE),
        ("plugins.pcgrad", "Input should be a valid dictionary; found 3"),
        ("plugins.mgda", "Plugin `mgda` expects options of type `MGDAOptions`. Found `PCGradOptions`."),
    ]


@pytest.mark.parametrize(
    ("plugins", "shown"),
    [
        ({"name": "task_norm", "options": {"alpha": 0.5}}, '"task_norm"'),
        ({"name": "task_norm"}, '"task_norm"'),
        ({"options": {"alpha": 0.5}}, '"..."'),
        (PluginSpec(name="task_norm"), '"task_norm"'),
    ],
    ids=["name-and-options", "name-only", "options-only", "PluginSpec"],
)
def test_a_single_spec_is_refused_with_the_list_form(registry, plugins, shown) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Balancer(sgd(), plugins=plugins, registry=registry)

    assert errors_of(excinfo) == [
        (
            "plugins",
            "expected a list of plugins or a mapping of plugin name -> options, "
            f"found one plugin spec {reprlib.repr(plugins)}; "
            f'put it in a list: plugins=[{{"name": {shown}, "options": ...}}]',
        )
    ]


def test_a_config_takes_a_mapping_of_plugin_name_to_options(registry, tmp_path) -> None:
    section = {"plugins": {"task_norm": {"alpha": 0.5}, "pcgrad": None}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 4, "balancer": section}))
    expected = BalancerConfig(plugins=[PluginSpec(name="task_norm", options={"alpha": 0.5}), PluginSpec(name="pcgrad")])

    assert load_config(section) == load_config(path) == expected
    assert BalancerConfig.model_validate(section) == expected
    for source in (section, {"balancer": section}, path):
        opt = Balancer.from_config(sgd(), source, registry=registry)
        assert [p.name for p in opt.plugins] == ["task_norm", "pcgrad"]
        assert opt.plugins[0].options.alpha == 0.5


def test_errors_in_a_config_mapping_carry_the_section_prefix_and_the_plugin_name(registry, tmp_path) -> None:
    config = {"balancer": {"plugins": {"task_norm": {"alpha": 2}, "nope": {}}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    expected = [
        ("balancer.plugins.task_norm.alpha", "Input should be less than or equal to 1; found 2"),
        ("balancer.plugins.nope", UNKNOWN_NOPE),
    ]

    for source in (config, path):
        with pytest.raises(ConfigError) as excinfo:
            Balancer.from_config(sgd(), source, registry=registry)
        assert errors_of(excinfo) == expected


def test_a_single_spec_in_a_config_is_refused_with_the_list_form(registry) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), {"balancer": {"plugins": {"name": "task_norm", "options": {}}}}, registry=registry)

    assert errors_of(excinfo) == [
        (
            "balancer.plugins",
            "expected a list of plugins or a mapping of plugin name -> options, found one plugin spec "
            "{'name': 'task_norm', 'options': {}}; "
            """put it in a list: "plugins": [{"name": "task_norm", "options": ...}]""",
        )
    ]


# -- values that are no plugin list -------------------------------------------------------------
def test_a_bare_string_is_refused_once_with_the_list_form(registry) -> None:
    message = """expected a list of plugins, found the single string 'task_norm'; write plugins=["task_norm"]"""

    with pytest.raises(ConfigError) as excinfo:
        Balancer(sgd(), plugins="task_norm", registry=registry)
    assert errors_of(excinfo) == [("plugins", message)]

    with pytest.raises(ConfigError) as excinfo:
        build_plugins("task_norm", registry, prefix="split_half.")
    assert errors_of(excinfo) == [("split_half.plugins", message)]


def test_a_bare_string_in_a_config_is_refused_once_with_the_list_form(registry, tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"balancer": {"plugins": "task_norm"}}))
    expected = [
        (
            "balancer.plugins",
            """expected a list of plugins, found the single string 'task_norm'; write "plugins": ["task_norm"]""",
        )
    ]

    for source in ({"balancer": {"plugins": "task_norm"}}, path):
        with pytest.raises(ConfigError) as excinfo:
            Balancer.from_config(sgd(), source, registry=registry)
        assert errors_of(excinfo) == expected
        with pytest.raises(ConfigError) as excinfo:
            load_config(source)
        assert errors_of(excinfo) == expected


@pytest.mark.parametrize(
    ("plugins", "found"),
    [
        (None, "None of type `NoneType`"),
        (5, "5 of type `int`"),
        (b"task_norm", "b'task_norm' of type `bytes`"),
        ({"task_norm"}, "{'task_norm'} of type `set` (a set has no order; plugins run in the order given)"),
        (TaskNorm(), f"{reprlib.repr(TaskNorm())} of type `TaskNorm`"),
    ],
    ids=["None", "int", "bytes", "set", "instance"],
)
def test_a_value_that_is_no_plugin_list_is_refused_once(registry, plugins, found) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Balancer(sgd(), plugins=plugins, registry=registry)

    assert errors_of(excinfo) == [
        (
            "plugins",
            f"expected a list of plugins or a mapping of plugin name -> options, found {found}; "
            'write e.g. plugins=["task_norm"]',
        )
    ]


# -- each problem reported once, with its path --------------------------------------------------
BAD_ENTRIES = {
    "bad-options": (
        {"name": "task_norm", "options": {"alpha": 5}},
        ".0.options.alpha",
        "Input should be less than or equal to 1; found 5",
    ),
    "options-not-a-dict": (
        {"name": "task_norm", "options": 3},
        ".0.options",
        "Input should be a valid dictionary; found 3",
    ),
    "unknown-name": ("nope", ".0.name", UNKNOWN_NOPE),
    "unknown-name-in-a-spec": ({"name": "nope"}, ".0.name", UNKNOWN_NOPE),
    "int-entry": (5, ".0", f"{ENTRY_FORMS}; found `5`"),
    "list-entry": (["task_norm", {}], ".0", f"{ENTRY_FORMS}; found `['task_norm', {{}}]`"),
    "null-entry": (None, ".0", f"{ENTRY_FORMS}; found `None`"),
    "missing-name": ({"options": {}}, ".0.name", "Field required"),
    "name-not-a-string": ({"name": 5}, ".0.name", "Input should be a valid string; found 5"),
    "empty-name": ("", ".0.name", "String should have at least 1 character; found ''"),
    "extra-key": ({"name": "task_norm", "opts": {}}, ".0.opts", "Extra inputs are not permitted; found {}"),
}


@pytest.mark.parametrize("source", ["dict", "deepspeed-dict", "json-file"])
@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_each_bad_entry_is_reported_exactly_once_with_its_path(registry, tmp_path, source, case) -> None:
    entry, where, message = BAD_ENTRIES[case]
    section = {"plugins": ["pcgrad", entry][1:]}  # the bad entry alone, at index 0
    prefix = "plugins" if source == "dict" else "balancer.plugins"
    config = section if source == "dict" else {"train_batch_size": 4, "balancer": section}
    if source == "json-file":
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"train_batch_size": 4, "balancer": section}))

    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), config, registry=registry)
    assert errors_of(excinfo) == [(prefix + where, message)]

    with pytest.raises(ConfigError) as excinfo:
        balancer.config.resolve_config(config, registry)
    assert errors_of(excinfo) == [(prefix + where, message)]

    with pytest.raises(ConfigError) as excinfo:
        build_plugins([entry], registry)
    assert errors_of(excinfo) == [("plugins" + where, message)]


def test_bad_entries_together_are_each_reported_once_in_order(registry) -> None:
    entries = [entry for entry, _, _ in BAD_ENTRIES.values()]

    with pytest.raises(ConfigError) as excinfo:
        Balancer.from_config(sgd(), {"balancer": {"plugins": entries, "on_nonfinite": "x"}}, registry=registry)

    expected = [(f"balancer.plugins.{i}{where[2:]}", msg) for i, (_, where, msg) in enumerate(BAD_ENTRIES.values())]
    assert errors_of(excinfo) == [*expected, ("balancer.on_nonfinite", "Input should be 'zero' or 'raise'; found 'x'")]


def test_load_config_reports_structural_problems_once_and_leaves_names_and_options_to_resolve() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(
            {"plugins": [5, {"name": "task_norm", "opts": {}}, "nope", {"name": "task_norm", "options": {"alpha": 5}}]}
        )

    assert errors_of(excinfo) == [
        ("plugins.0", f"{ENTRY_FORMS}; found `5`"),
        ("plugins.1.opts", "Extra inputs are not permitted; found {}"),
    ]


def test_a_config_dict_may_hold_what_balancer_takes(registry) -> None:
    instance = TaskNorm(alpha=0.5)

    config, plugins = balancer.config.resolve_config({"plugins": [instance, ("pcgrad", None)]}, registry)

    assert plugins[0] is instance
    assert [p.name for p in plugins] == ["task_norm", "pcgrad"]
    assert config.plugins == [
        PluginSpec(name="task_norm", options=instance.options.model_dump()),
        PluginSpec(name="pcgrad"),
    ]


def test_a_balancer_config_inside_a_balancer_section_is_built_not_dropped(registry) -> None:
    opt = Balancer.from_config(sgd(), {"balancer": BalancerConfig(plugins=["task_norm"])}, registry=registry)

    assert [p.name for p in opt.plugins] == ["task_norm"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(BUILTINS),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.sampled_from(BUILTINS), children, max_size=4)
    ),
    max_leaves=12,
)


@given(value=JSON_VALUES)
def test_any_json_value_as_plugins_builds_or_is_a_config_error_without_repeats(
    registry, tmp_path_factory, value
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "ds.json"
    path.write_text(json.dumps({"balancer": {"plugins": value}}))
    for call in (
        lambda: balancer.config.resolve_config({"plugins": value}, registry),
        lambda: balancer.config.resolve_config(path, registry),
        lambda: build_plugins(value, registry),
        lambda: load_config({"plugins": value}),
    ):
        try:
            call()
        except ConfigError as exc:
            assert exc.errors and len(set(exc.errors)) == len(exc.errors)
            assert all(isinstance(p, str) and isinstance(m, str) and m for p, m in exc.errors)


# -- files that are no JSON config --------------------------------------------------------------
def _both_readers_refuse(registry, path, message) -> None:
    """``load_config`` and ``Balancer.from_config`` each raise one ConfigError with ``message``."""
    for read in (load_config, lambda p: Balancer.from_config(sgd(), p, registry=registry)):
        with pytest.raises(ConfigError) as excinfo:
            read(path)
        assert errors_of(excinfo) == [("", message)]


def test_a_binary_file_is_a_config_error_naming_the_file(registry, tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x81\x82{}")
    message = f"config file `{path}` is not JSON text: byte 0 cannot be decoded as utf-8; save it as UTF-8"

    _both_readers_refuse(registry, path, message)


def test_a_utf8_file_with_a_byte_order_mark_reads(tmp_path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(SECTION).encode())

    assert load_config(path) == EXPECTED


def test_deeply_nested_json_is_a_config_error_naming_the_file(registry, tmp_path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    message = (
        f"config file `{path}` nests lists or objects too deeply to read "
        f"(about {sys.getrecursionlimit()} levels or more)"
    )

    _both_readers_refuse(registry, path, message)


def test_a_huge_integer_is_a_config_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "huge.json"
    path.write_text('{"on_nonfinite": ' + "1" * 5000 + "}")

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)

    [(where, message)] = errors_of(excinfo)
    assert where == ""
    assert message.startswith(f"config file `{path}` is not valid JSON: Exceeds the limit (4300 digits)")


def test_repeated_keys_in_a_json_file_are_a_config_error_not_dropped(tmp_path) -> None:
    path = tmp_path / "repeated.json"
    path.write_text(
        '{"plugins": {"task_norm": {"alpha": 0.5}, "task_norm": {}}, "on_nonfinite": "raise", "on_nonfinite": "zero"}'
    )

    with pytest.raises(ConfigError) as excinfo:
        load_config(path)

    assert errors_of(excinfo) == [
        (
            "",
            f"config file `{path}` repeats the key(s) `task_norm`, `on_nonfinite` in one object "
            "(JSON would keep only the last); write each key once",
        )
    ]


@given(data=st.binary(max_size=64))
def test_any_bytes_in_a_file_read_or_are_a_config_error(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("cfg") / "any.json"
    path.write_bytes(data)

    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.errors


def test_clipping_is_configured_with_the_plugins(registry) -> None:
    model = torch.nn.Linear(2, 1)
    cfg = {"balancer": {"plugins": ["task_norm"], "max_grad_norm": 0.5, "norm_type": "inf"}}
    opt = Balancer.from_config(torch.optim.SGD(model.parameters(), lr=0.1), cfg, registry=registry)
    assert opt.max_grad_norm == 0.5
    with pytest.raises(ConfigError) as excinfo:
        load_config({"norm_type": 1.0})
    [(where, message)] = errors_of(excinfo)
    assert where == "" and "norm_type = 1.0 without max_grad_norm would be ignored" in message
