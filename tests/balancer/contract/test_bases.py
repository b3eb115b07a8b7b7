"""The plugin bases: ``GramWeighting`` (the chaining rule, once) and ``TapPlugin`` (the tap protocol)."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, GramWeighting, GroupStats, Plugin, TapPlugin
from balancer.contract.testing import check_plugin, random_stats, tap_event
from balancer.contract.weighting import weighted_gram, weighted_stats


class InverseNorm(GramWeighting):
    """Factors 1/‖g_i‖ (0 for a zero gradient), recording the stats it was given."""

    name = "inverse_norm"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[GroupStats] = []

    def weigh(self, stats, state):
        self.seen.append(stats)
        norms = stats.norms
        return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0), state


def test_weigh_sees_the_weighted_gradients_and_its_factors_multiply_the_weights():
    plugin = InverseNorm()
    stats = random_stats(3, seed=1)
    incoming = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out, _ = plugin.update(stats, incoming, {})
    (seen,) = plugin.seen
    torch.testing.assert_close(seen.gram, torch.diag(incoming) @ stats.gram @ torch.diag(incoming))
    assert seen.names == stats.names and seen.step == stats.step
    torch.testing.assert_close(seen.losses, stats.losses)
    torch.testing.assert_close(out, incoming / (incoming.abs() * stats.norms))  # each contribution has norm 1


def test_first_in_a_chain_weigh_sees_the_gradients_themselves():
    plugin = InverseNorm()
    stats = random_stats(4, seed=2)
    plugin.update(stats, torch.ones(4, dtype=torch.float64), {})
    assert torch.equal(plugin.seen[0].gram, stats.gram)


def test_weighted_helpers():
    stats = random_stats(3)
    w = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(weighted_gram(stats.gram, w), w[:, None] * stats.gram * w[None, :])
    assert torch.equal(weighted_stats(stats, w).gram, weighted_gram(stats.gram, w))


def test_a_gram_weighting_passes_the_conformance_suite():
    check_plugin(InverseNorm())


def test_a_gram_weighting_must_implement_weigh():
    class NoWeigh(GramWeighting):
        name = "no_weigh"

    with pytest.raises(TypeError, match="abstract"):
        NoWeigh()


class Halve(TapPlugin):
    """Halves every tapped gradient."""

    name = "halve_taps"

    def tap(self, event, state, tap_stats):
        return event.grad / 2, tap_stats


def test_tap_plugin_defaults():
    plugin = Halve()
    assert plugin.uses_taps and plugin.needs_taps and not plugin.acts_on_groups
    assert plugin.init_tap_stats() == {} and plugin.merge_tap_stats({"a": 1}, {}) == {"a": 1}
    weights = torch.ones(2, dtype=torch.float64)
    assert plugin.update(random_stats(2), weights, {}) == (weights, {})
    check_plugin(plugin, tap_events=[tap_event(torch.randn(3, 2), "a")])


def test_a_weighting_plugin_has_no_taps():
    plugin = InverseNorm()
    assert not plugin.uses_taps and not plugin.needs_taps and plugin.acts_on_groups
    with pytest.raises(AssertionError, match="not a TapPlugin"):
        check_plugin(plugin, tap_events=[tap_event(torch.randn(3, 2), "a")])


def test_a_tap_plugin_must_implement_tap_or_update():
    with pytest.raises(TypeError, match=r"must implement update\(\), tap\(\), or both"):

        class Nothing(TapPlugin):
            name = "nothing_tapped"


def test_a_plugin_defining_tap_must_derive_from_tap_plugin():
    with pytest.raises(TypeError, match="defines tap\\(\\) but derives from Plugin: derive it from balancer.TapPlugin"):

        class Old(Plugin):
            name = "old_tap"

            def tap(self, event, state, tap_stats):
                return event.grad * 3, tap_stats

    class Both(TapPlugin):
        name = "both"
        acts_on_groups = True

        def update(self, stats, weights, state):
            return weights * 2, state

        def tap(self, event, state, tap_stats):
            return event.grad * 3, tap_stats

    assert Both().uses_taps and Both().acts_on_groups
    w = torch.nn.Parameter(torch.ones(2))
    opt = Balancer(torch.optim.SGD([w], lr=1.0), plugins=[Both()])
    with opt.group("a"):
        opt.tap(w * 1.0, group="a").sum().backward()
    opt.step()
    assert w.tolist() == [-5.0, -5.0]  # 1 - 2 * 3


def test_built_in_plugins_declare_their_base():
    """Each built-in derives from the base of what it does: taps, a coordinate-wise combine rule, or a
    weighting of the (weighted) gradients; only crmogm, which replaces the incoming weights by their
    average over steps instead of weighing the gradients, is a plain Plugin."""
    from balancer.contract.combine import CombineRule
    from balancer.plugins import BUILTIN_PLUGINS, CRMOGM, BalancedDPO, GradDrop, ReplayBias, TrimmedMean

    bases = {BalancedDPO: TapPlugin, ReplayBias: TapPlugin, GradDrop: CombineRule, TrimmedMean: CombineRule}
    for cls in BUILTIN_PLUGINS:
        base = bases.get(cls, Plugin if cls is CRMOGM else GramWeighting)
        assert issubclass(cls, base), cls
        others = {TapPlugin, CombineRule, GramWeighting} - {base}
        assert not any(issubclass(cls, other) for other in others), cls
        assert "version" not in vars(cls), f"{cls.__name__} restates the default version"
