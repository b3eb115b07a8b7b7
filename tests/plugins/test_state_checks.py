"""What every built-in plugin declares about its state and its inputs: ``check_state`` (run on every
checkpoint load) refuses corrupt states and accepts the "unknown" markers the plugin keeps, and
``needs_losses`` is True exactly for the plugins whose weights depend on ``stats.losses``."""

from __future__ import annotations

import math

import pytest
import torch

from balancer import GroupStats
from balancer.contract.plugin import InvalidStateError
from balancer.contract.testing import random_stats
from balancer.plugins import BUILTIN_PLUGINS, DWA, FAMO, MGDA, BalancedDPO, GradVac, NashMTL, ReplayBias, TaskNorm
from tests.conftest import required_options


def _run(plugin, steps=3, k=3, losses=True):
    state, out = plugin.init(), []
    for t in range(steps):
        stats = random_stats(k, seed=t, step=t)
        if not losses:
            stats = GroupStats.from_gram(stats.gram, stats.names, step=t)  # losses unknown: NaN
        weights, state = plugin.update(stats, torch.ones(k, dtype=torch.float64), state)
        out.append(weights)
    return torch.stack(out), state


@pytest.mark.parametrize(
    "plugin",
    [cls(required_options(cls.name, "group0")) for cls in BUILTIN_PLUGINS]
    + [MGDA(normalization="loss"), MGDA(normalization="loss+")],
    ids=[cls.name for cls in BUILTIN_PLUGINS] + ["mgda-loss", "mgda-loss+"],
)
def test_needs_losses_is_true_exactly_when_the_weights_depend_on_the_losses(plugin):
    with_losses, _ = _run(plugin)
    without, _ = _run(plugin, losses=False)
    assert plugin.needs_losses == (not torch.equal(with_losses, without))


def _replay_state():
    plugin = ReplayBias()
    sums = {"count": torch.tensor([3.0, 1.0]), "pos": torch.tensor([1.5, 0.2]), "neg": torch.tensor([0.4, 0.9])}
    return plugin.merge_tap_stats(plugin.init(), {k: v.double() for k, v in sums.items()})


def _set(state, path, value):
    *parents, last = path
    node = state
    for key in parents:
        node = node[key]
    node[last] = value(node[last]) if callable(value) else value


CORRUPT = [
    (TaskNorm(beta=0.5), ("ema_norms", "group1"), torch.tensor(math.nan), r"ema_norms\.group1: found nan"),
    (TaskNorm(beta=0.5), ("ema_norms", "group1"), torch.ones(2), r"ema_norms\.group1: .*shape \(2,\); expected 0-d"),
    (TaskNorm(), ("updates",), -1, r"updates: found -1; this count cannot be negative"),
    (NashMTL(), ("updates",), -(2**70), r"updates: found -1180591620717411303424"),
    (TaskNorm(), ("ema_target",), torch.tensor(-1.0).double(), r"ema_target: found -1\.0"),
    (FAMO(), ("names",), ["group0", "group0", "group2"], r"names: found \['group0', 'group0', 'group2'\]"),
    (FAMO(), ("logits",), lambda t: t[:2], r"logits: found shape \(2,\); expected \(3,\)"),
    (FAMO(), ("steps",), lambda t: -t, r"steps\[0\]: found -2\.0; this value cannot be negative"),
    (FAMO(), ("log_loss",), lambda t: t.clone().fill_(math.inf), r"log_loss\[0\]: found inf; .* finite or NaN"),
    (DWA(), ("before",), lambda t: t[:1], r"before: found shape \(1,\)"),
    (GradVac(), ("targets",), lambda t: t + 1.0, r"targets\[\d, \d\]: found .*in \[-1, 1\]"),
    (NashMTL(), ("alpha", "group2"), torch.tensor(-0.5).double(), r"alpha\.group2: found -0\.5"),
    (NashMTL(), ("alpha",), [1.0], r"alpha: found .*expected a dict"),
    (
        BalancedDPO(chosen="group0", rejected="group1", beta=0.5),
        ("task_norm", "ema_norms", "group0"),
        torch.tensor(math.inf).double(),
        r"task_norm\.ema_norms\.group0: found inf",
    ),
]


@pytest.mark.parametrize(("plugin", "path", "value", "message"), CORRUPT, ids=[str(c[3])[:40] for c in CORRUPT])
def test_check_state_refuses_corrupt_states_naming_the_value(plugin, path, value, message):
    _, state = _run(plugin)
    plugin.check_state(state)
    _set(state, path, value)
    with pytest.raises(InvalidStateError, match=message):
        plugin.check_state(state)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("seen",), lambda t: t * 2, r"seen: found \[2\.0, 2\.0\]; expected flags 0 or 1"),
        (("neg",), lambda t: t[:1], r"neg: found 1 classes; `count` has 2"),
        (("pos",), lambda t: -t, r"pos\[0\]: found -1\.5"),
        (("task_steps",), lambda t: t.double(), r"task_steps: found a torch.float64 tensor"),
    ],
)
def test_replay_bias_check_state(path, value, message):
    state = _replay_state()
    ReplayBias().check_state(state)
    _set(state, path, value)
    with pytest.raises(InvalidStateError, match=message):
        ReplayBias().check_state(state)


def test_unknown_markers_pass():
    """NaN where a plugin keeps "not known yet", and -inf in balanced_dpo's logged log-probs (π = 0)."""
    _, famo = _run(FAMO(), losses=False)
    _, dwa = _run(DWA(), steps=1)
    assert famo["log_loss"].isnan().all() and dwa["before"].isnan().all()
    FAMO().check_state(famo)
    DWA().check_state(dwa)
    TaskNorm().check_state(TaskNorm().init())
    dpo = BalancedDPO()
    dpo.check_state({**dpo.init(), "logp": torch.tensor([-math.inf, -3.0], dtype=torch.float64)})
