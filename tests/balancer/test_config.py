"""Config: reading dicts, JSON files, DeepSpeed configs and models; every error reported at once
with its path; frozen options models; ``Balancer.from_config``; the JSON schema."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import balancer
from balancer import Balancer, BalancerConfig, ConfigError, PluginSpec, Registry, build_plugins, load_config
from balancer.plugins import BUILTIN_PLUGINS, TaskNorm, TaskNormOptions

UNKNOWN_NOPE = (
    f"Unknown plugin `nope`. Available plugins: {', '.join(sorted(p.name for p in BUILTIN_PLUGINS))}. "
    "Install the package that provides it, or pass the plugin class or instance directly."
)
SECTION = {"plugins": [{"name": "task_norm", "options": {"alpha": 0.25}}, "other"], "on_nonfinite": "raise"}
EXPECTED = BalancerConfig(
    plugins=[PluginSpec(name="task_norm", options={"alpha": 0.25}), PluginSpec(name="other")], on_nonfinite="raise"
)

BUILTINS = sorted(plugin.name for plugin in BUILTIN_PLUGINS)


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
        ({"plugins": "task_norm"}, [("plugins", "Input should be a valid list; found 'task_norm'")]),
        ({"plugins": [""]}, [("plugins.0.name", "String should have at least 1 character; found ''")]),
        (
            {"plugins": [5]},
            [("plugins.0", "Input should be a valid dictionary or instance of PluginSpec; found 5")],
        ),
        (
            {"plugins": [{"name": "task_norm", "option": {}}]},
            [("plugins.0.option", "Extra inputs are not permitted; found {}")],
        ),
        ({"balancer": 3}, [("balancer", "Input should be a valid dictionary or instance of BalancerConfig; found 3")]),
    ],
    ids=["plugins-not-a-list", "empty-name", "entry-not-a-dict", "misspelt-options", "section-not-a-dict"],
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
            (
                "plugins.0",
                "a plugin entry must be a name, a (name, options) pair, a {'name', 'options'} dict, "
                "a Plugin class or a Plugin instance; found `5`",
            ),
        ),
        (("task_norm", "alpha=1"), ("plugins.0.options", "Input should be a valid dictionary; found 'alpha=1'")),
        ({"name": "task_norm", "opts": {}}, ("plugins.0.opts", "Extra inputs are not permitted; found {}")),
    ],
    ids=["int", "options-not-a-dict", "misspelt-options"],
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


@given(alpha=st.floats(min_value=0.0, max_value=1.0))
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

    assert set(schema["properties"]) == {"plugins", "on_nonfinite"}
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
    paths = [path for path, _ in errors_of(excinfo)]
    assert paths == ["balancer.on_nonfinite", "balancer.plugins.1.name"]
    assert errors_of(excinfo)[1][1] == UNKNOWN_NOPE
