"""A step is all or nothing: a failed inner step leaves everything as it was, and a retry applies
exactly one update (bit for bit the update of a run that never failed)."""

from __future__ import annotations

import warnings

import pytest
import torch

from balancer import Balancer, BalancerWarning, NonFiniteGradientWarning, Plugin, PluginError
from balancer.plugins import BUILTIN_PLUGINS
from tests.conftest import plugin_entries


class FlakySGD(torch.optim.SGD):
    """SGD whose next ``fail`` steps raise, as an out-of-memory in the inner step would."""

    fail = 0

    def step(self, closure=None):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().step(closure)


def _snapshot(model, opt):
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": grads,
        "states": {k: {kk: vv for kk, vv in v.items()} for k, v in opt.plugin_states.items()},
        "names": opt.backend.names,
        "step": opt.balancer_state_dict()["step"],
        "last": opt.last_stats,
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(same.all())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _capture(model, opt, batches, group_loss, ungrouped: bool):
    if ungrouped:
        group_loss(model, batches["g0"]).mul(0.3).backward()
    for name, batch in batches.items():
        with opt.group(name):
            group_loss(model, batch).backward()


OPTIONS = {
    "plain": {},
    "clip-l2": {"max_grad_norm": 0.5},
    "clip-l1": {"max_grad_norm": 0.5, "norm_type": 1.0},
}


@pytest.mark.parametrize("ungrouped", [False, True])
@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
def test_a_failed_inner_step_changes_nothing_and_a_retry_applies_one_update(
    ungrouped, options, make_model, make_batches, group_loss
):
    ref_model, model = make_model(), make_model()
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=0.1), plugins=["task_norm"], **OPTIONS[options])
    inner = FlakySGD(model.parameters(), lr=0.1)
    opt = Balancer(inner, plugins=["task_norm"], **OPTIONS[options])
    for step in range(3):
        batches = make_batches(seed=step)
        _capture(ref_model, ref, batches, group_loss, ungrouped)
        ref.step()
        ref.zero_grad()
        _capture(model, opt, batches, group_loss, ungrouped)
        before = _snapshot(model, opt)
        inner.fail = 2
        for _ in range(2):
            with pytest.raises(RuntimeError, match="out of memory"):
                opt.step()
            assert _same(_snapshot(model, opt), before)
        opt.step()  # the retry
        opt.zero_grad()
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)  # exactly one update per step, bit for bit
    assert opt.balancer_state_dict()["step"] == 3
    assert _same(ref.plugin_states, opt.plugin_states)


def test_a_failed_step_of_the_layer_capture_is_retried_exactly(make_batches):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    ref_model, model = make(), make()
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=0.1), plugins=["task_norm"], model=ref_model)
    inner = FlakySGD(model.parameters(), lr=0.1)
    opt = Balancer(inner, plugins=["task_norm"], model=model, max_grad_norm=0.5)
    ref = Balancer(
        torch.optim.SGD(ref_model.parameters(), lr=0.1), plugins=["task_norm"], model=ref_model, max_grad_norm=0.5
    )
    batches = make_batches()
    for m, o in ((ref_model, ref), (model, opt)):
        m(batches["g0"][0]).sum().mul(0.1).backward()  # ungrouped
        o.backward_tasks({n: torch.nn.functional.mse_loss(m(x), y) for n, (x, y) in batches.items()})
    ref.step()
    before = _snapshot(model, opt)
    inner.fail = 1
    with pytest.raises(RuntimeError):
        opt.step()
    assert _same(_snapshot(model, opt), before)
    opt.step()
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dropped_groups_stay_dropped_on_a_retry(make_model, make_batches, group_loss):
    ref_model, model = make_model(), make_model()
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=0.1), plugins=["task_norm"])
    inner = FlakySGD(model.parameters(), lr=0.1)
    opt = Balancer(inner, plugins=["task_norm"])
    batches = make_batches()
    for m, o in ((ref_model, ref), (model, opt)):
        for name, batch in batches.items():
            with o.group(name):
                loss = group_loss(m, batch)
                (loss * float("nan") if name == "g1" else loss).backward()
    with pytest.warns(NonFiniteGradientWarning):
        ref.step()
    inner.fail = 1
    with pytest.warns(NonFiniteGradientWarning), pytest.raises(RuntimeError):
        opt.step()
    with pytest.warns(NonFiniteGradientWarning, match="g1"):
        opt.step()
    assert opt.last_stats.weights[1].item() == 0.0
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


class InPlace(Plugin):
    """Writes into the state it is given (forbidden), then fails when told to."""

    name = "in_place"
    fail = False

    def init(self):
        return {"count": torch.zeros(())}

    def update(self, stats, weights, state):
        state["count"].add_(1)
        if self.fail:
            raise RuntimeError("plugin failure")
        return weights, state


def test_a_plugin_that_mutates_its_state_cannot_change_it_on_a_refused_step(make_model, make_batches, group_loss):
    model = make_model()
    plugin = InPlace()
    inner = FlakySGD(model.parameters(), lr=0.1)
    opt = Balancer(inner, plugins=[plugin])
    _capture(model, opt, make_batches(), group_loss, False)
    plugin.fail = True
    with pytest.raises(PluginError):
        opt.step()
    assert opt.plugin_states["in_place"]["count"].item() == 0
    plugin.fail = False
    inner.fail = 1
    with pytest.raises(RuntimeError):
        opt.step()
    assert opt.plugin_states["in_place"]["count"].item() == 0
    opt.step()
    assert opt.plugin_states["in_place"]["count"].item() == 1


@pytest.mark.parametrize("plugin", [p.name for p in BUILTIN_PLUGINS])
def test_every_group_non_finite_gives_weight_zero_and_a_warning(plugin, make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugin_entries(plugin))
    state = opt.plugin_states[plugin]
    for name, batch in make_batches().items():
        with opt.group(name):
            (group_loss(model, batch) * float("inf")).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BalancerWarning)  # non-finite groups (and replay_bias: no tap)
        opt.step()
    assert opt.last_stats.weights.tolist() == [0.0, 0.0, 0.0]
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # a zero update (SGD without momentum)
    if not opt.plugins[0].uses_taps:  # (a tap plugin folds its tap statistics every step)
        assert _same(opt.plugin_states[plugin], state)  # update() was not asked
