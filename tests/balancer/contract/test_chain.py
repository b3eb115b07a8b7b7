"""``Chain``: plugins in order, copies of states, errors naming the plugin, one finiteness check."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats, Plugin, PluginError
from balancer.contract.chain import Chain, run_plugins
from balancer.contract.state_checks import InvalidStateError


class Scale(Plugin):
    """Multiplies the weights by a constant and counts its calls in the state."""

    name = "scale"

    def __init__(self, factor: float = 2.0, name: str = "scale") -> None:
        super().__init__()
        self.factor, self.name = factor, name  # type: ignore[misc]

    def init(self):
        return {"calls": torch.zeros((), dtype=torch.float64)}

    def update(self, stats, weights, state):
        state["calls"] += 1  # in place, on purpose: the chain hands over a copy
        return weights * self.factor, state


class Seen(Plugin):
    """Returns weights 1, 2, 3, ... and records the weights it was given."""

    name = "seen"

    def __init__(self) -> None:
        super().__init__()
        self.given: list[torch.Tensor] = []

    def update(self, stats, weights, state):
        self.given.append(weights.clone())
        return torch.arange(1.0, stats.num_groups + 1, dtype=torch.float64), state


class Fails(Plugin):
    name = "fails"

    def update(self, stats, weights, state):
        raise RuntimeError("boom")


class NaN(Plugin):
    name = "nan"

    def update(self, stats, weights, state):
        return weights * torch.nan, state


def _stats(k: int = 3) -> GroupStats:
    return GroupStats.from_gram(torch.eye(k, dtype=torch.float64))


def test_plugins_run_in_order_on_the_previous_weights():
    seen = Seen()
    chain = Chain([Scale(3.0), seen, Scale(2.0, name="twice")])
    weights, states = chain.run(_stats(), chain.init())
    torch.testing.assert_close(seen.given[0], torch.full((3,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64))
    assert sorted(states) == ["scale", "seen", "twice"]


def test_states_given_are_not_modified():
    chain = Chain([Scale()])
    states = chain.init()
    _, new_states = chain.run(_stats(), states)
    assert states["scale"]["calls"].item() == 0.0
    assert new_states["scale"]["calls"].item() == 1.0


def test_update_continues_from_the_given_weights():
    chain = Chain([Scale(2.0)])
    weights, _ = chain.update(_stats(2), torch.tensor([1.0, 5.0], dtype=torch.float64), chain.init())
    torch.testing.assert_close(weights, torch.tensor([2.0, 10.0], dtype=torch.float64))


def test_a_failing_plugin_is_named():
    chain = Chain([Scale(), Fails()])
    with pytest.raises(PluginError, match=r"Plugin `fails` failed in update\(\): RuntimeError: boom"):
        chain.run(_stats(), {"scale": Scale().init(), "fails": {}})


def test_a_nested_chain_names_the_inner_plugin_once():
    inner = Chain([Fails()], prefix="outer.")

    class Outer(Plugin):
        name = "outer"

        def update(self, stats, weights, state):
            return inner.update(stats, weights, state)

    with pytest.raises(PluginError) as info:
        Chain([Outer()]).run(_stats(), {"outer": {"fails": {}}})
    assert str(info.value).startswith("Plugin `outer.fails` failed in update(): RuntimeError: boom")
    assert "Plugin `outer` failed" not in str(info.value)


def test_non_finite_weights_are_reported_after_the_chain_naming_the_first_culprit():
    chain = Chain([Scale(), NaN(), Scale(name="after")])
    with pytest.raises(PluginError, match="Plugin `nan` returned non-finite weights"):
        chain.run(_stats(), {"scale": Scale().init(), "nan": {}, "after": Scale().init()})


def test_update_does_not_check_finiteness():
    weights, _ = Chain([NaN()]).update(_stats(), torch.ones(3, dtype=torch.float64), {"nan": {}})
    assert torch.isnan(weights).all()


def test_wrong_weights_are_refused_with_the_plugin_name():
    class Short(Plugin):
        name = "short"

        def update(self, stats, weights, state):
            return weights[:1], state

    with pytest.raises(PluginError, match="Plugin `pre.short` returned weights of shape"):
        Chain([Short()], prefix="pre.").run(_stats(), {"short": {}})


def test_check_state_prefixes_paths_with_the_plugin_name():
    chain = Chain([Scale()])
    chain.check_state(chain.init())
    with pytest.raises(InvalidStateError, match=r"one entry per inner plugin \['scale'\]"):
        chain.check_state({})
    with pytest.raises(InvalidStateError, match=r"^scale\.calls: found nan"):
        chain.check_state({"scale": {"calls": torch.tensor(float("nan"), dtype=torch.float64)}})


def test_run_plugins_is_the_chain_from_ones():
    weights, _ = run_plugins([Scale(5.0)], {"scale": Scale().init()}, _stats(2))
    torch.testing.assert_close(weights, torch.full((2,), 5.0, dtype=torch.float64))


def test_an_empty_chain_gives_ones():
    weights, states = Chain([]).run(_stats(4), {})
    assert weights.tolist() == [1.0] * 4 and states == {}
