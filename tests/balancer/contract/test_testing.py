"""The public conformance suite catches each property it promises to check."""

from __future__ import annotations

import pytest
import torch

from balancer import Plugin, TapPlugin
from balancer.contract.testing import check_plugin, tap_event


class _Base(Plugin):
    name = "probe"

    def update(self, stats, weights, state):
        return weights, state


class _InvNorm(_Base):
    def update(self, stats, weights, state):
        return weights / stats.norms, state  # inf for a zero gradient


class _Syncs(_Base):
    def update(self, stats, weights, state):
        if stats.norms.max().item() > 1.0:
            return weights * 2, state
        return weights, state


class _Mutates(_Base):
    def init(self):
        return {"seen": torch.zeros(())}

    def update(self, stats, weights, state):
        state["seen"].add_(1)
        return weights, state


class _FirstGroupSpecial(_Base):
    def update(self, stats, weights, state):
        return torch.cat([weights[:1] * 3, weights[1:]]), state


class _Opaque:
    pass


class _UnsafeState(_Base):
    def init(self):
        return {"thing": None}

    def update(self, stats, weights, state):
        return weights, {"thing": _Opaque()}


class _GrowingState(_Base):
    def init(self):
        return {"history": torch.zeros(0, dtype=torch.float64)}

    def update(self, stats, weights, state):
        return weights, {"history": torch.cat([state["history"], stats.norms[:1]])}


class _WrongShape(_Base):
    def update(self, stats, weights, state):
        return weights.sum().reshape(1), state


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_InvNorm(), "non-finite weights"),
        (_Syncs(), r"called Tensor.item\(\)"),
        (_Mutates(), "modified the state passed to update"),
        (_FirstGroupSpecial(), "not permutation equivariant"),
        (_UnsafeState(), "Unsupported|WeightsUnpickler|weights_only|_Opaque"),
        (_GrowingState(), "changed structure between updates"),
        (_WrongShape(), r"weights of shape \(1,\) for 2 groups"),
    ],
)
def test_check_plugin_catches(plugin, message):
    with pytest.raises(Exception, match=message):
        check_plugin(plugin)


def test_check_plugin_accepts_a_conforming_plugin():
    check_plugin(_Base())
    check_plugin(_FirstGroupSpecial(), permutation_equivariant=False)


class _TapCounter(TapPlugin):
    """A well-behaved tap plugin; subclasses break one rule each."""

    name = "tap_counter"

    def init(self):
        return {"rows": torch.zeros(1, dtype=torch.float64)}

    def init_tap_stats(self):
        return {"rows": torch.zeros(1, dtype=torch.float64)}

    def tap(self, event, state, tap_stats):
        return event.grad * 0.5, {"rows": tap_stats["rows"] + event.num_rows}

    def merge_tap_stats(self, state, tap_stats):
        return {"rows": state["rows"] + tap_stats["rows"]}


class _TapSyncs(_TapCounter):
    name = "tap_syncs"

    def tap(self, event, state, tap_stats):
        scale = 2.0 if event.grad.sum().item() > 0 else 1.0
        return event.grad * scale, tap_stats


class _TapMutates(_TapCounter):
    name = "tap_mutates"

    def tap(self, event, state, tap_stats):
        tap_stats["rows"] += event.num_rows
        return event.grad, tap_stats


class _TapReshapes(_TapCounter):
    name = "tap_reshapes"

    def tap(self, event, state, tap_stats):
        return event.grad.sum(0), tap_stats


def _events():
    return [tap_event(torch.randn(4, 3), ["a", "b", "a", "a"], torch.tensor([0, 2, 1, 2]))]


def test_check_plugin_accepts_a_good_tap_plugin():
    check_plugin(_TapCounter(), tap_events=_events())


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_TapSyncs(), "Tensor.item\\(\\) in tap\\(\\)"),
        (_TapMutates(), "in place"),
        (_TapReshapes(), "wrong shape"),
    ],
)
def test_check_plugin_catches_tap_plugins_breaking_the_rules(plugin, message):
    with pytest.raises(AssertionError, match=message):
        check_plugin(plugin, tap_events=_events())


class _ByCombinedNorm(_Base):
    def update(self, stats, weights, state):
        trace = stats.gram.trace()
        ratio = torch.where(trace > 0, stats.gram.sum() / torch.where(trace > 0, trace, 1.0), 1.0)
        return weights / ratio, state  # scale-free, finite for zero gradients; inf when they cancel out


def test_check_plugin_tries_degenerate_gradient_sets():
    with pytest.raises(AssertionError, match="non-finite weights"):
        check_plugin(_ByCombinedNorm(), num_groups=2)


class _MutatesNested(_Base):
    """Returns a fresh state, but first inserts into the dict nested in the one it was given."""

    def init(self):
        return {"ema": {}}

    def update(self, stats, weights, state):
        state["ema"]["group0"] = stats.norms[0]
        return weights, {"ema": dict(state["ema"])}


class _UnknownMarker(_Base):
    """Keeps the last norm of group 0 above 0.5, NaN (unknown) until there is one, and declares it."""

    nonfinite_state = {"last": "nan"}

    def init(self):
        return {"last": torch.tensor(float("nan"), dtype=torch.float64)}

    def update(self, stats, weights, state):
        return weights, {"last": torch.where(stats.norms[0] > 0.5, stats.norms[0], torch.nan)}


class _Undeclared(_UnknownMarker):
    nonfinite_state = {}


class _ChangesDtype(_Base):
    def init(self):
        return {"ema": torch.zeros(())}

    def update(self, stats, weights, state):
        return weights, {"ema": stats.norms.sum()}  # float64, init() gave float32


class _TinyFirstGroupSpecial(_Base):
    """Weights of 1e-20 (a plugin that returns them in its own units), and not permutation equivariant."""

    def update(self, stats, weights, state):
        return torch.cat([weights[:1] * 3e-20, weights[1:] * 1e-20]), state


def test_check_plugin_still_catches_state_modified_in_place_behind_a_fresh_state():
    with pytest.raises(AssertionError, match="modified the state passed to update"):
        check_plugin(_MutatesNested())


def test_check_plugin_runs_the_plugins_own_state_check():
    """What check_plugin accepts, a checkpoint load accepts: NaN only where the plugin declares it."""
    check_plugin(_UnknownMarker())
    with pytest.raises(AssertionError, match=r"refuses the state its init\(\) returned: last: found nan"):
        check_plugin(_Undeclared())
    with pytest.raises(AssertionError, match=r"refuses the state its update\(\) returned: ema: found a torch.float64"):
        check_plugin(_ChangesDtype())


def test_permutation_tolerance_follows_the_scale_of_the_weights():
    """An absolute 1e-12 would let weights of 1e-20 differ by any factor."""
    with pytest.raises(AssertionError, match="not permutation equivariant"):
        check_plugin(_TinyFirstGroupSpecial())
