"""``opt.backward_tasks``: one loss per group, equal to ``opt.backward``; and the choice of Gram form."""

from __future__ import annotations

import pytest
import torch

import balancer.capture.layer_gram as layer_gram
from balancer import Balancer, NonFiniteGradientWarning
from tests.balancer.capture.layer_capture_cases import TOL, _data, _Heads, _losses, _model, _sgd_update, _task_losses


@pytest.mark.parametrize("plugin", [None, "upgrad", "task_norm"])
@pytest.mark.parametrize("seq", [None, 2])
def test_tasks_on_a_shared_trunk_equal_per_task_backward(path, plugin, seq):
    x, _ = _data(10, seq, d_in=6)
    plugins = [plugin] if plugin else []
    ref_model, model = _Heads().double(), _Heads().double()
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=1.0), plugins=plugins)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=plugins, model=model)
    want = _sgd_update(ref_model, lambda: (ref.backward(_task_losses(ref_model, x, seq)), ref.step()))

    def run():
        opt.backward_tasks(_task_losses(model, x, seq))
        assert all(p.grad is None for p in model.parameters())  # no parameter gradient before step()
        opt.step()

    got = _sgd_update(model, run)
    assert opt.last_stats.names == ref.last_stats.names == ("t0", "t1", "t2")
    torch.testing.assert_close(opt.last_stats.gram, ref.last_stats.gram, **TOL)
    torch.testing.assert_close(opt.last_stats.losses, ref.last_stats.losses, **TOL)
    torch.testing.assert_close(opt.last_stats.weights, ref.last_stats.weights, **TOL)
    torch.testing.assert_close(got, want, **TOL)
    assert opt.last_stats.backward_calls == (1, 1, 1)


def test_tasks_with_one_forward_each_equal_per_group_backward(path):
    """Separate graphs per group (the groups of a batch, each with its own forward)."""
    models = [_model(True), _model(True)]
    x, y = _data(12, None)
    opts = [Balancer(torch.optim.SGD(m.parameters(), lr=1.0), plugins=["upgrad"], model=m) for m in models]

    def losses(model):
        chunks = zip(x.chunk(3), y.chunk(3), strict=True)
        return {f"g{i}": _losses(model, xs, ys).mean() for i, (xs, ys) in enumerate(chunks)}

    want = _sgd_update(models[0], lambda: (opts[0].backward(losses(models[0])), opts[0].step()))
    got = _sgd_update(models[1], lambda: (opts[1].backward_tasks(losses(models[1])), opts[1].step()))
    torch.testing.assert_close(opts[1].last_stats.gram, opts[0].last_stats.gram, **TOL)
    torch.testing.assert_close(got, want, **TOL)


def test_tasks_and_samples_accumulate_in_one_step(path):
    """Two task calls on different batches plus a sample-group call: every cross term counts."""
    model, ref_model = _Heads().double(), _Heads().double()
    (x1, _), (x2, _) = _data(6, None, seed=1), _data(5, None, seed=2)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["upgrad"], model=model)
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=1.0), plugins=["upgrad"])

    def samples_losses(m):
        return m.heads[0](m.trunk(x2)).sum(1) ** 2

    def run_ref():
        ref.backward(_task_losses(ref_model, x1, None))
        ref.backward(_task_losses(ref_model, x2, None))
        per_sample = samples_losses(ref_model)
        ref.backward({"t1": per_sample[:2].sum(), "extra": per_sample[2:].sum()})
        ref.step()

    def run():
        opt.backward_tasks(_task_losses(model, x1, None))
        opt.backward_tasks(_task_losses(model, x2, None))
        opt.backward_samples(samples_losses(model), group=["t1", "t1", "extra", "extra", "extra"])
        opt.step()

    want, got = _sgd_update(ref_model, run_ref), _sgd_update(model, run)
    assert opt.last_stats.names == ref.last_stats.names
    torch.testing.assert_close(opt.last_stats.gram, ref.last_stats.gram, **TOL)
    torch.testing.assert_close(opt.last_stats.losses, ref.last_stats.losses, **TOL)
    torch.testing.assert_close(got, want, **TOL)
    assert opt.last_stats.backward_calls == ref.last_stats.backward_calls == (2, 3, 2, 1)


def test_nonfinite_task_is_dropped_and_the_others_are_exact(path):
    x, _ = _data(8, None, d_in=6)
    ref_model, model = _Heads().double(), _Heads().double()
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=1.0))
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)

    def run_ref():
        losses = _task_losses(ref_model, x, None)
        ref.backward({"t0": losses["t0"], "t2": losses["t2"]})
        ref.step()

    def run():
        losses = _task_losses(model, x, None)
        losses["t1"] = losses["t1"] * float("inf")  # its output gradients are inf/NaN everywhere
        with pytest.warns(NonFiniteGradientWarning, match="t1"):
            opt.backward_tasks(losses)
            opt.step()

    want, got = _sgd_update(ref_model, run_ref), _sgd_update(model, run)
    assert opt.last_stats.weights.tolist() == [1.0, 0.0, 1.0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL)


def test_the_cheapest_form_is_chosen():
    # groups of samples (each row in one piece): the row form; 4 tasks on one trunk call (P = 4R):
    # the shared form; long sequences with few groups: the per-group gradients
    assert layer_gram.choose_form(64, 64, 4, 512, 1024) == "rows"
    assert layer_gram.choose_form(4 * 64, 64, 4, 512, 1024) == "shared"
    assert layer_gram.choose_form(8 * 512, 8 * 512, 2, 256, 256) == "per_group"


def test_tasks_under_grad_scaler_fold_the_scale():
    x, _ = _data(8, None, d_in=6)
    models = [_Heads().float(), _Heads().float()]
    opts = [Balancer(torch.optim.SGD(m.parameters(), lr=0.1), plugins=["upgrad"], model=m) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opts[0].backward_tasks(_task_losses(models[0], x.float(), None))
    opts[0].step()
    opts[1].backward_tasks({k: scaler.scale(v) for k, v in _task_losses(models[1], x.float(), None).items()})
    scaler.step(opts[1])
    scaler.update()
    torch.testing.assert_close(opts[1].last_stats.weights, opts[0].last_stats.weights, rtol=1e-5, atol=1e-7)
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
