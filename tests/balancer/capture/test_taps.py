"""Tensor taps: identity forward, rescaling equals reweighting the loss, per-step statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from balancer import Balancer, BalancerWarning, CaptureError, Plugin, PluginError, PluginOptions, TapPlugin
from balancer.contract.tap_event import TapEvent


class RowScale(TapPlugin):
    """Multiplies the rows of each group by a fixed factor; counts rows per label and per call."""

    name = "row_scale"

    class Options(PluginOptions):
        factors: dict[str, float] = {}

    def init(self):
        return {"counts": torch.zeros(0, dtype=torch.float64), "calls": torch.tensor(0.0, dtype=torch.float64)}

    def init_tap_stats(self):
        return {"counts": torch.zeros(0, dtype=torch.float64), "calls": torch.tensor(0.0, dtype=torch.float64)}

    def tap(self, event: TapEvent, state, tap_stats):
        factors = torch.tensor([self.options.factors.get(n, 1.0) for n in event.names], dtype=event.grad.dtype)
        row = factors[event.group_index].view(-1, *([1] * (event.grad.dim() - 1)))
        width = max(event.value.shape[-1], tap_stats["counts"].shape[0])
        counts = _pad(tap_stats["counts"], width)
        if event.labels is not None:
            counts = counts + torch.bincount(event.labels, minlength=width).to(torch.float64)
        return event.grad * row, {"counts": counts, "calls": tap_stats["calls"] + 1}

    def merge_tap_stats(self, state, tap_stats):
        width = max(state["counts"].shape[0], tap_stats["counts"].shape[0])
        counts = _pad(state["counts"], width) + _pad(tap_stats["counts"], width)
        return {"counts": counts, "calls": state["calls"] + tap_stats["calls"]}


def _pad(t, width):
    return torch.cat([t, t.new_zeros(width - t.shape[0])])


def _setup(factors=None, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[RowScale(factors=factors or {})])
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 3, 4, 0])
    return model, opt, x, y


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_identity_in_forward():
    model, opt, x, y = _setup()
    logits = model(x)
    tapped = opt.tap(logits, group="a", labels=y)
    assert tapped.shape == logits.shape and torch.equal(tapped, logits)
    assert tapped.requires_grad and tapped.grad_fn is not None


def test_without_tap_plugins_the_tensor_is_returned_as_is():
    opt = Balancer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    t = torch.randn(3, 2, requires_grad=True)
    assert opt.tap(t, group="a") is t


@pytest.mark.parametrize("inside_group", [False, True])
def test_rescaling_equals_the_explicitly_reweighted_loss(inside_group):
    factors = {"replay": 2.5, "current": 0.4}
    model, opt, x, y = _setup(factors)
    groups = ["current", "replay", "current", "replay", "replay", "current"]
    row_weights = torch.tensor([factors[g] for g in groups], dtype=torch.float64)

    def run():
        loss = F.cross_entropy(opt.tap(model(x), group=groups, labels=y), y)
        loss.backward()

    if inside_group:
        with opt.group("all"):
            run()
        got = None  # the group row holds the tapped gradient; read it from the update
    else:
        run()
        got = _grads(model)
    expected = torch.autograd.grad(
        (F.cross_entropy(model(x), y, reduction="none") * row_weights).mean(), list(model.parameters())
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    if got is None:
        got = [(b - p.detach()) / 0.1 for b, p in zip(before, model.parameters(), strict=True)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_stats_are_merged_at_step_and_accumulate_over_backward_passes():
    model, opt, x, y = _setup()
    for half in (slice(0, 3), slice(3, 6)):  # gradient accumulation: two micro-batches
        F.cross_entropy(opt.tap(model(x[half]), group="a", labels=y[half]), y[half]).backward()
    assert opt.plugin_states["row_scale"]["calls"].item() == 0  # nothing merged before step()
    opt.step()
    state = opt.plugin_states["row_scale"]
    assert state["calls"].item() == 2
    torch.testing.assert_close(state["counts"], torch.bincount(y, minlength=5).to(torch.float64))


def test_zero_grad_discards_the_pending_stats():
    model, opt, x, y = _setup()
    F.cross_entropy(opt.tap(model(x), group="a", labels=y), y).backward()
    opt.zero_grad()
    with pytest.warns(BalancerWarning, match="no tapped gradient"):  # the step saw none: it says so
        opt.step()
    assert opt.plugin_states["row_scale"]["calls"].item() == 0


def test_plugins_chain_in_the_users_order():
    seen = []

    class Recorder(RowScale):
        name = "recorder"

        def tap(self, event, state, tap_stats):
            seen.append(event.grad.clone())
            return event.grad, tap_stats

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = Balancer(torch.optim.SGD([w], lr=0.1), plugins=[RowScale(factors={"a": 3.0}), Recorder()])
    (opt.tap(w * 1.0, group="a") * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(seen[0], torch.tensor([3.0, 6.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 6.0, 9.0], dtype=torch.float64))


def test_event_rows_of_and_names():
    events = []

    class Spy(RowScale):
        name = "spy"

        def tap(self, event, state, tap_stats):
            events.append(event)
            return event.grad, tap_stats

    w = torch.nn.Parameter(torch.ones(4))
    opt = Balancer(torch.optim.SGD([w], lr=0.1), plugins=[Spy()])
    opt.tap(w * 2, group=["b", "a", "b", "b"]).sum().backward()
    (event,) = events
    assert event.names == ("b", "a")
    assert event.group_index.tolist() == [0, 1, 0, 0]
    assert event.rows_of("b").tolist() == [True, False, True, True]
    assert event.rows_of("missing").tolist() == [False] * 4
    torch.testing.assert_close(event.value, torch.full((4,), 2.0))


@pytest.mark.parametrize(
    ("tensor", "group", "labels", "message"),
    [
        (torch.ones(3, requires_grad=True), ["a", "b"], None, "one group name per row"),
        (torch.ones((), requires_grad=True), "a", None, "rows along dimension 0"),
        (torch.ones(3, requires_grad=True), "a", torch.ones(2), "one entry per row"),
        (torch.ones(3, requires_grad=True), "", None, "group"),
        ([1.0, 2.0], "a", None, "takes a tensor"),
    ],
)
def test_bad_tap_arguments_are_clear_errors(tensor, group, labels, message):
    opt = Balancer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), plugins=[RowScale()])
    with pytest.raises((CaptureError, ValueError, TypeError), match=message):
        opt.tap(tensor, group=group, labels=labels)


def test_a_failing_or_misbehaving_tap_plugin_is_named():
    class Broken(RowScale):
        name = "broken"

        def tap(self, event, state, tap_stats):
            return event.grad[:1], tap_stats

    class Keys(RowScale):
        name = "keys"

        def tap(self, event, state, tap_stats):
            return event.grad, {"other": torch.zeros(1)}

    for plugin, message in ((Broken(), "must return a gradient of shape"), (Keys(), "keys of init_tap_stats")):
        w = torch.nn.Parameter(torch.ones(3))
        opt = Balancer(torch.optim.SGD([w], lr=0.1), plugins=[plugin])
        with pytest.raises(PluginError, match=f"`{plugin.name}`.*{message}"):
            opt.tap(w * 1.0, group="a").sum().backward()


def test_a_plugin_must_implement_update_or_tap():
    with pytest.raises(TypeError, match="must implement update\\(\\), tap\\(\\), or both"):

        class Nothing(Plugin):
            name = "nothing"
