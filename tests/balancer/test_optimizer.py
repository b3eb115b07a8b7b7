"""Balancer as a torch optimizer: exactness against the bare optimizer, forwarding, hooks,
schedulers, pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from balancer import Balancer, BalancerWarning


def _bare_step(model, opt, batches, group_loss, weights=None):
    total = sum((weights or {}).get(n, 1.0) * group_loss(model, b) for n, b in batches.items())
    total.backward()
    opt.step()
    opt.zero_grad()


def _balancer_step(model, opt, batches, group_loss):
    for name, batch in batches.items():
        with opt.group(name):
            group_loss(model, batch).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("inner", ["sgd", "adamw", "adamw_fused", "adam_foreach"])
def test_no_plugin_equals_bare_optimizer_on_summed_losses(inner, make_model, make_batches, group_loss):
    def build(params):
        if inner == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if inner == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, foreach=False)
        if inner == "adamw_fused":
            return torch.optim.AdamW(params, lr=1e-2, fused=True)
        return torch.optim.Adam(params, lr=1e-2, foreach=True)

    # float64 so that the only difference, the order of summing the group gradients, stays
    # at rounding level (group gradients differ by 100x in scale here).
    ref, bal = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    ref_opt, bal_opt = build(ref.parameters()), Balancer(build(bal.parameters()))
    for step in range(4):
        batches = make_batches(seed=step, dtype=torch.float64)
        _bare_step(ref, ref_opt, batches, group_loss)
        _balancer_step(bal, bal_opt, batches, group_loss)
    for a, b in zip(ref.parameters(), bal.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_group_is_bit_for_bit(make_model, make_batches, group_loss):
    ref, bal = make_model(), make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    bal_opt = Balancer(torch.optim.AdamW(bal.parameters(), lr=1e-2))
    for step in range(5):
        batch = make_batches(seed=step, groups=1)
        _bare_step(ref, ref_opt, batch, group_loss)
        _balancer_step(bal, bal_opt, batch, group_loss)
    for a, b in zip(ref.parameters(), bal.parameters(), strict=True):
        assert torch.equal(a, b)


def test_float64_summed_gradient_matches_to_rounding(make_model, make_batches, group_loss):
    ref, bal = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    bal_opt = Balancer(torch.optim.SGD(bal.parameters(), lr=1e-3))
    batches = make_batches(groups=4, dtype=torch.float64)
    _bare_step(ref, ref_opt, batches, group_loss)
    _balancer_step(bal, bal_opt, batches, group_loss)
    for a, b in zip(ref.parameters(), bal.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_weights_are_applied_as_a_linear_combination(make_model, make_batches, group_loss):
    """A plugin returning fixed weights gives the bare optimizer's step on the weighted loss sum."""
    from balancer import Plugin

    class Fixed(Plugin):
        name = "fixed"

        def update(self, stats, weights, state):
            table = {"g0": 2.0, "g1": -0.5, "g2": 0.25}
            return weights * torch.tensor([table[n] for n in stats.names], dtype=weights.dtype), state

    ref, bal = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    bal_opt = Balancer(torch.optim.SGD(bal.parameters(), lr=1e-3), plugins=[Fixed()])
    batches = make_batches(dtype=torch.float64)
    _bare_step(ref, ref_opt, batches, group_loss, weights={"g0": 2.0, "g1": -0.5, "g2": 0.25})
    _balancer_step(bal, bal_opt, batches, group_loss)
    for a, b in zip(ref.parameters(), bal.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert bal_opt.last_stats.weights.tolist() == [2.0, -0.5, 0.25]


def test_param_groups_state_defaults_are_forwarded_not_copied(model):
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = Balancer(inner)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    new_groups = [dict(inner.param_groups[0])]
    opt.param_groups = new_groups  # what ZeRO does around each inner step
    assert inner.param_groups is new_groups
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.01})
    assert inner.param_groups[-1]["params"] == [extra]


def test_scheduler_changes_inner_lr_also_after_load_state_dict(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["task_norm"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _balancer_step(model, opt, make_batches(), group_loss)
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5
    opt.load_state_dict(opt.state_dict())  # rebinds the inner param_groups list
    _balancer_step(model, opt, make_batches(seed=1), group_loss)
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.25


def test_step_hooks_run_around_the_combined_step(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.last_stats is None)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.last_stats.names)))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _balancer_step(model, opt, make_batches(), group_loss)
    opt.load_state_dict(opt.state_dict())
    assert calls == [("pre", True), ("post", ("g0", "g1", "g2")), "sd_pre", "load_post"]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_both_ways(set_to_none, make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    _balancer_step(model, opt, make_batches(), group_loss)
    group_loss(model, make_batches()["g0"]).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_mid_capture_continues_identically(how, make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=[("task_norm", {"beta": 0.5})])
    _balancer_step(model, opt, make_batches(seed=0), group_loss)
    batches = make_batches(seed=1)
    with opt.group("g0"):
        group_loss(model, batches["g0"]).backward()
    bundle = (model, opt)
    model2, opt2 = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    for m, o in ((model, opt), (model2, opt2)):
        with o.group("g1"):
            group_loss(m, batches["g1"]).backward()
        o.step()
        o.zero_grad()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.plugin_states["task_norm"]["updates"] == 2
    assert len(opt2._optimizer_step_pre_hooks) == 0


def test_is_an_optimizer_and_repr(model):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    assert isinstance(opt, torch.optim.Optimizer)
    assert "task_norm" not in repr(opt) or "TaskNorm" in repr(opt)
    assert repr(opt).startswith("Balancer(inner=SGD, plugins=[TaskNorm(")


def test_closure_is_passed_to_the_inner_optimizer(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3))
    batches = make_batches()

    def closure():
        opt.zero_grad()
        loss = group_loss(model, batches["g0"])
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_plugins_that_balanced_nothing_warn_once(make_model, make_batches, group_loss):
    """A trainer that never enters a group (Trainer, Lightning automatic optimization, a closure)
    would run the plugins on nothing: the step says so, once per Balancer."""
    model = make_model()
    batches = make_batches()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm", "pcgrad"])
    group_loss(model, batches["g0"]).backward()
    with pytest.warns(BalancerWarning, match=r"plugins \['task_norm', 'pcgrad'\].*no group was captured"):
        opt.step()
    opt.zero_grad()
    group_loss(model, batches["g0"]).backward()
    opt.step()  # once per Balancer: no second warning (filterwarnings=error would fail here)
    opt.zero_grad()
    with opt.group("g0"):
        group_loss(model, batches["g0"]).backward()
    opt.step()
    closure_opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])

    def closure():
        closure_opt.zero_grad()
        loss = group_loss(model, batches["g1"])
        loss.backward()
        return loss

    with pytest.warns(BalancerWarning, match="closure"):
        closure_opt.step(closure)


def test_no_warning_when_groups_are_captured_or_nothing_acts_on_groups(make_model, make_batches, group_loss):
    model = make_model()
    batches = make_batches()
    for plugins in ([], [("balanced_dpo", {"rule": "prob"})]):  # no plugin; a plugin that acts at taps only
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins)
        x, y = batches["g0"]
        logp = opt.tap(model(x)[:, 0], group=["chosen", "rejected"] * 4, labels=torch.arange(8) // 2)
        (logp.sum() + group_loss(model, batches["g1"])).backward()
        opt.step()
        opt.zero_grad()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    for _ in range(2):
        opt.backward({name: group_loss(model, batch) for name, batch in batches.items()})
        opt.step()
        opt.zero_grad()


def _warns_on_the_first_step_only(opt, capture, match):
    """Two steps: the first warns (a ``BalancerWarning`` matching ``match``), the second does not."""
    for step in range(2):
        capture()
        if step == 0:
            with pytest.warns(BalancerWarning, match=match):
                opt.step()
        else:
            opt.step()  # filterwarnings = error: a second warning would fail here
        opt.zero_grad()


def test_tap_plugins_that_saw_no_tap_warn_once(make_model, make_batches, group_loss):
    model = make_model()
    batches = make_batches()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["replay_bias"])

    def capture():
        with opt.group("current"):
            group_loss(model, batches["g0"]).backward()

    _warns_on_the_first_step_only(opt, capture, r"\['replay_bias'\], which act at taps.*opt.tap")


def test_loss_based_plugins_without_recorded_losses_warn_once(make_model, make_batches, group_loss):
    model = make_model()
    batches = make_batches()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["famo"])

    def capture():
        for name, batch in batches.items():
            with opt.group(name):  # the loss value never reaches the Balancer
                group_loss(model, batch).backward()

    _warns_on_the_first_step_only(opt, capture, r"\['famo'\] weigh groups by their losses.*\['g0', 'g1', 'g2'\]")
    quiet = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["famo"])
    quiet.backward({name: group_loss(model, batch) for name, batch in batches.items()})
    quiet.step()


@pytest.mark.parametrize("forget", ["zero_grad", "step"])
def test_the_next_step_starts_from_nothing(make_model, make_batches, group_loss, forget):
    """What a step captured (loss values, backward calls, layer capture) is forgotten by step() and zero_grad()."""
    model = make_model()
    batches = make_batches()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    opt.backward({"g0": group_loss(model, batches["g0"]), "g1": group_loss(model, batches["g1"])})
    getattr(opt, forget)()
    with opt.group("g0"):
        group_loss(model, batches["g0"]).backward()
    opt.step()
    assert opt.last_stats.names == ("g0",) and opt.last_stats.backward_calls == (1,)
    assert torch.isnan(opt.last_stats.losses).all()  # the loss recorded in the step before is gone
    opt.zero_grad()
    opt.backward_tasks({"g1": group_loss(model, batches["g1"])})
    getattr(opt, forget)()
    opt.backward({"g2": group_loss(model, batches["g2"])})  # no layer capture is pending any more
    opt.step()
    assert opt.last_stats.names == ("g2",) and opt.last_stats.backward_calls == (1,)
