"""The ``balancer`` command: ``plugins`` (table and JSON), ``config-schema``, ``demo`` errors,
``--version`` and usage, called through ``balancer.tools.cli.main``, plus runs of the installed
console script; the lazy imports that keep ``--help`` fast; the message when the demo extra is missing."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

import balancer
import balancer.contract.registry
from balancer import Plugin, Registry
from balancer.plugins import BUILTIN_PLUGINS, TaskNorm
from balancer.tools.cli import main

OWN = "gradient-balancer"
TASK_NORM_SUMMARY = inspect.getdoc(TaskNorm).splitlines()[0]


class Echo(Plugin):
    """Returns the weights unchanged (a fake third-party plugin)."""

    name = "echo"

    def update(self, stats, weights, state):
        return weights, state


class FakeEntryPoint:
    group = "balancer"
    name = "echo"
    value = "echo_package.plugins"

    def load(self) -> object:
        module = types.ModuleType("echo_package.plugins")

        @balancer.hookimpl
        def balancer_register_plugins(register):
            register(Echo)

        module.balancer_register_plugins = balancer_register_plugins
        return module


class FakeDistribution:
    metadata = {"Name": "echo-balancer-plugin"}
    version = "10.2.3"
    entry_points = [FakeEntryPoint()]


@pytest.fixture
def with_echo_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sees this project plus a fake third-party package, through a fresh default registry."""
    dists = [importlib.metadata.distribution(OWN), FakeDistribution()]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))
    monkeypatch.setattr(balancer.contract.registry, "default_registry", Registry())
    monkeypatch.delenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", raising=False)


# -- plugins ------------------------------------------------------------------------------------
def test_plugins_prints_an_aligned_table(with_echo_installed, capsys) -> None:
    assert main(["plugins"]) == 0

    lines = capsys.readouterr().out.splitlines()
    version = balancer.__version__
    name_w = max(len(plugin.name) for plugin in BUILTIN_PLUGINS)
    dist_w = len("echo-balancer-plugin")
    version_w = max(len("version"), len(version), len("10.2.3"))

    def row(*cells: str) -> str:
        return f"{cells[0]:<{name_w}}  {cells[1]:<{dist_w}}  {cells[2]:<{version_w}}  {cells[3]}"

    assert lines == [
        row("name", "distribution", "version", "summary"),
        *sorted(
            [
                row(
                    "echo",
                    "echo-balancer-plugin",
                    "10.2.3",
                    "Returns the weights unchanged (a fake third-party plugin).",
                )
            ]
            + [row(p.name, OWN, version, p.summary()) for p in BUILTIN_PLUGINS]
        ),
    ]
    assert row("task_norm", OWN, version, TASK_NORM_SUMMARY) in lines


def test_plugins_json_lists_every_field(with_echo_installed, capsys) -> None:
    assert main(["plugins", "--json"]) == 0

    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed] == sorted(["echo", *(p.name for p in BUILTIN_PLUGINS)])
    assert {
        "name": "echo",
        "distribution": "echo-balancer-plugin",
        "version": "10.2.3",
        "summary": "Returns the weights unchanged (a fake third-party plugin).",
    } in listed
    assert {
        "name": "task_norm",
        "distribution": OWN,
        "version": balancer.__version__,
        "summary": TASK_NORM_SUMMARY,
    } in listed


def test_plugins_with_nothing_installed_says_so(monkeypatch, capsys) -> None:
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter([]))
    monkeypatch.setattr(balancer.contract.registry, "default_registry", Registry())

    assert main(["plugins"]) == 0
    assert capsys.readouterr().out == "No plugins found.\n"
    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_installed_console_script_lists_task_norm() -> None:
    script = Path(sysconfig.get_path("scripts")) / ("balancer.exe" if sys.platform == "win32" else "balancer")
    assert script.exists(), f"console script not installed at {script}; run `pip install -e .`"

    result = subprocess.run([str(script), "plugins"], capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["name", "distribution", "version", "summary"]
    [task_norm] = [r for r in rows if r.startswith("task_norm ")]
    assert task_norm.split(maxsplit=3) == ["task_norm", OWN, balancer.__version__, TASK_NORM_SUMMARY]


# -- config-schema ------------------------------------------------------------------------------
def test_config_schema_prints_the_json_schema(capsys) -> None:
    assert main(["config-schema"]) == 0

    schema = json.loads(capsys.readouterr().out)
    assert schema == balancer.config_schema()
    assert {"plugins", "on_nonfinite"} <= set(schema["properties"])
    assert "task_norm" in schema["plugin_options"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)


# -- demo (the demo itself: test_demo.py; the report command: test_report.py) ----------------------
def test_demo_with_an_unknown_plugin_fails_with_a_message(capsys) -> None:
    assert main(["demo", "--steps", "1", "--plugins", "nope"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("balancer demo: error: Invalid balancer configuration (1 error):\n")
    assert "  - plugins.0.name: Unknown plugin `nope`. Available plugins: " in err
    assert "Traceback" not in err


def test_demo_steps_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--steps", "0"])

    assert excinfo.value.code == 2
    assert "argument --steps: must be a positive integer, found 0" in capsys.readouterr().err


# -- usage --------------------------------------------------------------------------------------
def test_a_command_is_required(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([])

    assert excinfo.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])

    assert excinfo.value.code == 0
    assert "{plugins,config-schema,demo,report}" in capsys.readouterr().out


def test_version_prints_the_installed_version(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])

    assert excinfo.value.code == 0
    assert capsys.readouterr().out == f"balancer {importlib.metadata.version(OWN)}\n"


# -- lazy imports -------------------------------------------------------------------------------
def _fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_help_and_the_package_import_no_torch() -> None:
    """`balancer --help` answered in 5.7 s because `import balancer` imported torch; it imports nothing heavy now."""
    code = (
        "import sys\nimport balancer\nfrom balancer.tools.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'pydantic', 'matplotlib', 'numpy') if m in sys.modules))"
    )
    assert _fresh_python(code).splitlines()[-1] == "[]"


def test_every_public_name_resolves_on_first_use() -> None:
    code = (
        "import balancer\nfrom balancer import Balancer, hookimpl\nfrom balancer.optimizer import Balancer as B\n"
        "assert Balancer is B\nmissing = [n for n in balancer.__all__ if not hasattr(balancer, n)]\n"
        "print(missing, set(balancer.__all__) <= set(dir(balancer)), balancer.optimizer.__name__)"
    )
    assert _fresh_python(code) == "[] True balancer.optimizer"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        balancer.nope  # noqa: B018


def test_a_missing_demo_extra_names_the_install_command(monkeypatch, tmp_path, capsys) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    monkeypatch.delitem(sys.modules, "balancer.tools.report", raising=False)
    (tmp_path / "m.jsonl").write_text('{"run": "a", "step": 0}\n')

    assert main(["report", str(tmp_path / "m.jsonl")]) == 2

    err = capsys.readouterr().err
    assert err.startswith("balancer report: error: `balancer demo` and `balancer report` need `matplotlib`")
    assert err.rstrip().endswith('pip install "gradient-balancer[demo]"')
