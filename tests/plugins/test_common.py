"""What every built-in plugin must do, one suite parametrised over ``BUILTIN_PLUGINS``: conformance
(``check_plugin``) with each plugin's option sets, weights on the test device without host syncs
on the shared adversarial cases, bad options refused by the plugin's own pydantic model, its
registry entry and its repr.

A new built-in plugin is covered by adding it to ``BUILTIN_PLUGINS`` and, if it has options worth
checking, to ``CONFORMANCE`` / ``BAD_OPTIONS`` below; ``test_every_builtin_is_in_the_tables``
fails until it is.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import annotated_types
import pydantic
import pytest
import torch

import balancer
from balancer import Balancer, ConfigError, Registry
from balancer.contract.testing import _no_host_sync, check_plugin
from balancer.plugins import BUILTIN_PLUGINS
from tests.plugins.cases import dpo_pair_events, gradient_cases, replay_events, stats_of

OWN = "gradient-balancer"
PLUGINS = {cls.name: cls for cls in BUILTIN_PLUGINS}
DOCUMENTED = {
    "task_norm", "balanced_dpo", "replay_bias", "pcgrad", "mgda", "upgrad", "imtl_g", "cagrad",
    "aligned_mtl", "nash_mtl", "gradvac", "dualproj", "famo", "dwa", "rlw", "uncertainty", "gls",
    "gradnorm", "imtl_l", "imtl", "config", "krum",
    "fairgrad",
    "excess_mtl", "modo", "sdmgrad",
    "graddrop", "trimmed_mean",
    "mt_grpo",
    "pcd", "crmogm", "constant",
    "cosmos", "pbi", "stch",
}  # fmt: skip

# The option sets each plugin's conformance runs with, as ``options`` or ``(options, check_plugin kwargs)``.
CONFORMANCE: dict[str, list[Any]] = {
    "graddrop": [{}, {"seed": 7, "leak": 0.25}, {"leak": {"group0": 1.0, "group2": 0.5}}],
    "trimmed_mean": [
        ({}, {"num_groups": (3, 4, 7)}),
        ({"trim_number": 0}, {}),
        ({"trim_number": 2}, {"num_groups": (5, 6, 20)}),
    ],
    "task_norm": [
        {},
        {"max_weight": 2.0},
        {"alpha": 0.3},
        {"beta": 0.9},
        {"target": "ema"},
        {"target": "min", "beta": 0.5},
        {"target": "max"},
    ],
    "balanced_dpo": [
        {"rule": "norm"},
        {"rule": "norm", "beta": 0.5},
        {"rule": "prob"},
        {"rule": "prob", "side": "rejected"},
    ],
    "replay_bias": [{}, {"warmup": 0, "groups": ("replay",)}],
    # pcgrad, gradvac and rlw are permutation equivariant: their random orders and samples are drawn
    # per (pair of) group name(s), not per position, and gradvac's targets are keyed by name.
    "pcgrad": [{}, {"reduction": "mean"}, {"seed": 123}],
    "imtl_g": [{}, ({"rtol": 1e-8}, {"num_groups": (3, 8)})],
    "aligned_mtl": [
        ({}, {"num_groups": (1, 2, 5, 8)}),
        ({"scale_mode": "median"}, {"num_groups": (1, 2, 5, 8)}),
        ({"scale_mode": "mean"}, {"num_groups": (1, 2, 5, 8)}),
    ],
    "gradvac": [{}, {"beta": 0.01}, {"beta": 1.0, "seed": 3}],
    "famo": [{}, {"optimizer": "sgd"}, {"min_loss": 0.05}, {"min_loss": {"group1": 0.05}}],
    "dwa": [{}, {"temperature": 0.1}, {"beta": 0.9}],
    "uncertainty": [{}, {"optimizer": "sgd", "lr": 0.1}, {"init": 1.0, "lr": 0.01}],
    "gls": [{}],
    "fairgrad": [{}, {"alpha": 0.0}, {"alpha": 0.5}, {"alpha": 3.0, "iterations": 20}],
    "config": [{}, ({"rtol": 1e-8}, {"num_groups": (3, 8)})],
    # krum at k = 3 (one neighbour) always ties the closest pair; from k = 5 on ties are measure-zero
    "krum": [({}, {"num_groups": (5, 8)}), ({"n_byzantine": 1, "n_selected": 2}, {"num_groups": (5, 7)})],
    "imtl_l": [{}, {"lr": 0.1, "optimizer": "sgd"}],
    "imtl": [{}, ({"lr": 0.05}, {"num_groups": (3, 8)})],
    "gradnorm": [{}, {"alpha": 0.0, "lr": 0.1}, {"parametrization": "direct", "optimizer": "sgd", "lr": 0.01}],
    "rlw": [{}, {"seed": 9}, {"std": 3.0}],
    "mgda": [{}, {"normalization": "l2"}, {"normalization": "loss+"}],
    "upgrad": [{}, {"reg_eps": 1e-4}],
    "dualproj": [{}],
    "cagrad": [{}, {"c": 0.0}, {"c": 2.0, "rescale": 2}],
    "nash_mtl": [{}, {"max_norm": 0.0}, {"update_weights_every": 2, "optim_niter": 5}],
    # pcd's primary is a name: the conformance stats name their groups group0, group1, ...
    "pcd": [
        {"primary": "group0"},
        {"primary": "group0", "tau": 1.0, "beta": 0.0, "eps": 0.0},
        {"primary": "group0", "group_tau": {"group1": 0.5, "group3": 0.0}},
    ],
    "crmogm": [{}, {"alpha": 1.0}, {"alpha": 0.5, "initial": {"group0": 0.3, "group2": 2.0}}],
    "constant": [
        {"weights": {"group0": 2.0, "group1": -0.5}, "default": 1.0},
        {"weights": {f"group{i}": 0.5 * i for i in range(12)}},
        {"weights": {}, "default": 0.25},
    ],
    "mt_grpo": [{}, {"apply": "sampling"}, {"optimizer": "sgd", "reward_weight": 0.0}],
    "excess_mtl": [{}, {"warmup_steps": 2}, {"robust_step_size": 0.01, "warmup_steps": 1}],
    "modo": [{}, {"gamma": 1.0, "rho": 0.0}],
    "sdmgrad": [{}, {"lambda_": 0.0, "iterations": 5}, {"lambda_": 5.0, "momentum": 0.0, "lr": 1.0}],
    # the scalarizers' preferences and references are keyed by name: the stats name groups group0, group1, ...
    "cosmos": [{}, {"lambda_": 0.0}, {"lambda_": 8.0, "preference": {"group0": 0.7, "group2": 0.0}, "default": 0.3}],
    "pbi": [{}, {"theta": 0.0}, {"preference": {"group0": 2.0, "group1": 0.0}, "default": 1.0, "reference": 0.05}],
    "stch": [
        {},
        {"mu": 1e-3},
        {"mu": 1.0, "preference": {"group1": 0.5}, "default": 0.1, "reference": {"group0": 0.2}},
    ],
}

# Tap plugins are checked with these events (a function of the device).
TAP_EVENTS = {"balanced_dpo": dpo_pair_events, "replay_bias": replay_events}

# Hand-picked refusals per plugin (out of bounds, wrong literal, wrong type, a name from another
# library); every field's bounds, a wrong type and an unknown key are also tried for every plugin.
BAD_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "graddrop": [{"seed": -1}, {"leak": 1.5}, {"leak": {"a": -0.1}}, {"leak": "half"}],
    "trimmed_mean": [{"trim_number": -1}, {"trim_number": 1.5}],
    "task_norm": [{"alpha": 1.5}, {"beta": 1.0}, {"target": "median"}, {"eps": 0}, {"gamma": 1}, {"max_weight": 0}],
    "balanced_dpo": [{"rule": "ratio"}, {"side": "both"}, {"chosen": ""}],
    "replay_bias": [{"warmup": -1}, {"scale": 0}, {"decay": 0}, {"task_start": "epoch"}, {"x": 1}],
    "pcgrad": [{"reduction": "max"}, {"seed": "x"}, {"beta": 0.5}],
    "imtl_g": [{"rtol": 0}, {"rtol": 0.1}, {"seed": 1}],
    "aligned_mtl": [{"scale_mode": "max"}, {"rtol": 0}, {"rtol": 1.0}, {"pref": [1, 2]}],
    "gradvac": [{"beta": 1.5}, {"beta": -0.1}, {"eps": 0.0}, {"eps": 0.5}, {"gamma": 1}],
    "famo": [{"lr": -1}, {"gamma": -0.1}, {"eps": 0}, {"optimizer": "lbfgs"}, {"beta": 1}],
    "dwa": [{"temperature": 0}, {"beta": 1.0}, {"beta": -0.5}, {"T": 2}],
    "uncertainty": [{"lr": -1e-3}, {"optimizer": "lbfgs"}, {"init": "x"}, {"scalar": 0.0}],
    "gls": [{"temperature": 1.0}],
    "fairgrad": [{"alpha": -1.0}, {"iterations": 0}, {"max_iters": 10}],
    "config": [{"rtol": 0}, {"rtol": 0.1}, {"pref_vector": [1, 2]}],
    "krum": [{"n_byzantine": -1}, {"n_selected": 0}, {"f": 1}],
    "imtl_l": [{"lr": -1.0}, {"optimizer": "rmsprop"}],
    "imtl": [{"rtol": 0}, {"rtol": 0.1}, {"lr": -1.0}],
    "gradnorm": [{"alpha": -1.0}, {"lr": 0.0}, {"parametrization": "log"}, {"optimizer": "adamw"}],
    "rlw": [{"std": 0}, {"seed": 1.5}, {"dist": "Normal"}],
    "mgda": [{"normalization": "l1"}, {"epsilon": 1e-3}],
    "upgrad": [{"reg_eps": -1.0}, {"reg_eps": 2.0}, {"pref": 1}],
    "dualproj": [{"reg_eps": -1.0}, {"pref_vector": [1, 2]}],
    "cagrad": [{"c": -0.1}, {"rescale": 3}, {"alpha": 0.5}],
    "nash_mtl": [{"update_weights_every": 0}, {"optim_niter": 0}, {"max_norm": -1.0}, {"n_tasks": 3}],
    "pcd": [
        {"tau": 0.02},  # no primary
        {"primary": ""},
        {"primary": "a", "group_tau": {"b": 2.0}},
        {"primary": "a", "group_tau": {"a": 0.1}},
    ],
    "crmogm": [{"alpha": 0.0}, {"initial": [1.0, 2.0]}, {"initial_weights": [1.0]}],
    "constant": [{}, {"weights": {}}, {"weights": {"a": 1.0}, "default": 1.0}, {"weights": {"a": float("nan")}}],
    "mt_grpo": [{"reward_decay": 1.0}, {"improvement_clip": 0}, {"apply": "both"}, {"lambda_bias": 0.2}],
    "excess_mtl": [{"robust_step_size": 0.0}, {"warmup_steps": -1}, {"n_warmup_steps": 3}],
    "modo": [{"gamma": 0.0}, {"rho": -0.1}, {"estimate": "three_batches"}],
    "sdmgrad": [{"momentum": 1.0}, {"iterations": 0}, {"lambda_": -1.0}, {"pref_vector": [1, 2]}, {"n_iter": 20}],
    "cosmos": [
        {"lambda_": -0.1},
        {"weights": [0.5, 0.5]},  # torchjd's positional preference
        {"preference": {"a": -1.0}},
        {"preference": {"a": float("inf")}},
        {"preference": {}},
        {"preference": {"a": 0.0}, "default": 0.0},
        {"default": 0.5},  # ignored without a preference
    ],
    "pbi": [{"theta": -1.0}, {"eps": 0.0}, {"reference": float("nan")}, {"reference": {"a": float("-inf")}}],
    "stch": [{"mu": 0.0}, {"mu": -1.0}, {"preference": {"a": float("nan")}}, {"reference": [0.0, 1.0]}],
}


def _option_sets() -> list:
    params = []
    for name, sets in CONFORMANCE.items():
        for i, entry in enumerate(sets):
            options, kwargs = entry if isinstance(entry, tuple) else (entry, {})
            params.append(pytest.param(name, options, kwargs, id=f"{name}-{i}"))
    return params


def _out_of_bounds(cls: type) -> list:
    """One value just outside every numeric bound declared on the plugin's options model."""
    params = []
    for field, info in cls.Options.model_fields.items():
        for bound in info.metadata:
            integer = info.annotation is int
            step = 1 if integer else 0.5
            if isinstance(bound, annotated_types.Ge):
                value = bound.ge - step
            elif isinstance(bound, annotated_types.Gt):
                value = bound.gt
            elif isinstance(bound, annotated_types.Le):
                value = bound.le + step
            elif isinstance(bound, annotated_types.Lt):
                value = bound.lt
            else:
                continue
            params.append(pytest.param(cls.name, field, value, id=f"{cls.name}-{field}={value}"))
    return params


def _fields() -> list:
    return [
        pytest.param(cls.name, f, id=f"{cls.name}-{f}") for cls in BUILTIN_PLUGINS for f in cls.Options.model_fields
    ]


def _refused(name: str, options: dict[str, Any], field: str | None = None) -> None:
    """Refused at construction, by the plugin's pydantic model, reported against its config path."""
    with pytest.raises(pydantic.ValidationError):
        PLUGINS[name].Options(**options)
    path = r"plugins\.0\.options" + (rf"\.{re.escape(field)}[:.]" if field else "")
    with pytest.raises(ConfigError, match=path):
        Balancer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), plugins=[(name, options)])


def test_every_builtin_is_in_the_tables():
    assert set(PLUGINS) == DOCUMENTED  # the names DESIGN.md promises
    assert len(PLUGINS) == len(BUILTIN_PLUGINS)  # no two built-ins share a name
    assert set(CONFORMANCE) == set(PLUGINS)
    assert set(BAD_OPTIONS) == set(PLUGINS)
    tapping = {p.values[0] for p in _option_sets() if PLUGINS[p.values[0]](p.values[1]).uses_taps}
    assert tapping <= set(TAP_EVENTS)  # a tap plugin's conformance needs events


# -- conformance --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options", "kwargs"), _option_sets())
def test_conformance(name, options, kwargs, device):
    """``check_plugin`` with the statistics and tap events on the test device."""
    events = TAP_EVENTS[name](device) if name in TAP_EVENTS else ()
    check_plugin(PLUGINS[name](options), tap_events=events, device=device, **kwargs)


@pytest.mark.parametrize(("name", "options", "kwargs"), _option_sets())
def test_weights_stay_on_the_device_without_host_sync(name, options, kwargs, device):
    """Every shared adversarial case and a few steps of state, on the test device: ``update`` (and
    ``tap``/``merge_tap_stats``) read no device value on the host, and the weights are a finite
    float64 ``[k]`` tensor on the device of the stats."""
    plugin = PLUGINS[name](options)
    for case, a in gradient_cases(11).items():
        k = a.shape[0]
        if k < plugin.min_groups:
            continue
        losses = torch.rand(k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) + 0.1
        state = plugin.init()
        for step in range(3):
            stats = stats_of(a * (1 + step), device, losses=losses * (1 + step), step=step)
            with _no_host_sync(plugin.name):
                weights, state = plugin.update(stats, torch.ones(k, dtype=torch.float64, device=device), state)
            assert weights.device == stats.gram.device, (case, weights.device)
            assert weights.shape == (k,) and weights.dtype == torch.float64, case
            assert torch.isfinite(weights).all(), (case, weights)
    if name in TAP_EVENTS:
        state, tap_stats = plugin.init(), plugin.init_tap_stats()
        for event in TAP_EVENTS[name](device):
            with _no_host_sync(plugin.name, "tap()"):
                grad, tap_stats = plugin.tap(event, state, tap_stats)
            assert grad.device == event.grad.device and torch.isfinite(grad).all()
        with _no_host_sync(plugin.name, "merge_tap_stats()"):
            plugin.merge_tap_stats(state, tap_stats)


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options"),
    [pytest.param(name, options, id=f"{name}-{options}") for name, bad in BAD_OPTIONS.items() for options in bad],
)
def test_bad_options_are_refused(name, options):
    _refused(name, options)


@pytest.mark.parametrize("name", list(PLUGINS))
def test_unknown_option_is_refused(name):
    _refused(name, {"no_such_option": 1}, field="no_such_option")


@pytest.mark.parametrize(("name", "field"), _fields())
def test_option_of_the_wrong_type_is_refused(name, field):
    _refused(name, {field: {"wrong": ["type"]}}, field=field)


@pytest.mark.parametrize(("name", "field", "value"), [p for cls in BUILTIN_PLUGINS for p in _out_of_bounds(cls)])
def test_option_out_of_its_bounds_is_refused(name, field, value):
    _refused(name, {field: value}, field=field)


@pytest.mark.parametrize("name", list(PLUGINS))
def test_options_model_is_frozen_and_forbids_extra_keys(name):
    config = PLUGINS[name].Options.model_config
    assert config.get("frozen") is True and config.get("extra") == "forbid"


# -- registry entry and repr --------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry():
    return Registry()


@pytest.mark.parametrize("name", list(PLUGINS))
def test_registry_entry(name, registry):
    cls = PLUGINS[name]
    info = registry.get(name)
    assert (info.name, info.distribution, info.version) == (name, OWN, balancer.__version__)
    assert info.plugin_class is cls and info.options_model is cls.Options
    assert info.summary == inspect.getdoc(cls).splitlines()[0]
    assert info.summary.strip() and info.summary.endswith(".")
    assert name.isidentifier() and name == name.lower()


@pytest.mark.parametrize(("name", "options", "kwargs"), _option_sets())
def test_repr_names_the_class_and_every_option(name, options, kwargs):
    plugin = PLUGINS[name](options)
    text = repr(plugin)
    assert text.startswith(f"{type(plugin).__name__}(") and text.endswith(")")
    for field, value in plugin.options.model_dump().items():
        assert f"{field}={value!r}" in text
    assert repr(PLUGINS[name](plugin.options.model_dump())) == text  # rebuilt from its options: the same plugin
