"""``opt.backward_samples``: the layer capture equals the per-group reference (groups of samples)."""

from __future__ import annotations

import copy

import pytest
import torch

from balancer import Balancer, NonFiniteGradientWarning
from tests.balancer.capture.layer_capture_cases import (
    TOL,
    _data,
    _groups,
    _Heads,
    _losses,
    _model,
    _reference,
    _sgd_update,
)


@pytest.mark.parametrize("seq", [None, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_gram_and_update_equal_per_group_reference(path, seq, bias, k):
    model = _model(bias)
    x, y = _data(16, seq)
    groups = _groups(16, k)
    names, rows = _reference(model, x, y, groups)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)

    def run():
        opt.backward_samples(_losses(model, x, y), group=groups)
        opt.step()

    update = _sgd_update(model, run)
    assert opt.last_stats.names == tuple(names)
    torch.testing.assert_close(opt.last_stats.gram, rows @ rows.T, **TOL)
    torch.testing.assert_close(update, rows.sum(0), **TOL)
    assert opt.last_stats.backward_calls == (1,) * k


@pytest.mark.parametrize("plugin", ["task_norm", "upgrad"])
@pytest.mark.parametrize("seq", [None, 4])
def test_plugin_weights_combine_reference_gradients(path, plugin, seq):
    model = _model(True)
    x, y = _data(12, seq)
    groups = _groups(12, 3)
    _, rows = _reference(model, x, y, groups)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[plugin], model=model)
    update = _sgd_update(model, lambda: (opt.backward_samples(_losses(model, x, y), group=groups), opt.step()))
    weights = opt.last_stats.weights
    assert not torch.allclose(weights, torch.ones_like(weights))
    torch.testing.assert_close(update, weights @ rows, **TOL)


@pytest.mark.parametrize("seq", [None, 3])
def test_same_as_per_group_backward(path, seq):
    models = [_model(True), _model(True)]
    x, y = _data(10, seq)
    groups = ["a"] * 4 + ["b"] * 6
    opts = [Balancer(torch.optim.SGD(m.parameters(), lr=1.0), plugins=["upgrad"], model=m) for m in models]
    mask = torch.tensor([g == "a" for g in groups])

    def per_group():
        losses = _losses(models[0], x, y)
        opts[0].backward({"a": losses[mask].sum(), "b": losses[~mask].sum()})
        opts[0].step()

    def samples():
        opts[1].backward_samples(_losses(models[1], x, y), group=groups)
        opts[1].step()

    ref, got = _sgd_update(models[0], per_group), _sgd_update(models[1], samples)
    torch.testing.assert_close(opts[1].last_stats.gram, opts[0].last_stats.gram, **TOL)
    torch.testing.assert_close(opts[1].last_stats.losses, opts[0].last_stats.losses, **TOL)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("seq", [None, 3])
def test_accumulation_equals_one_call_on_concatenated_batch(path, seq):
    models = [_model(True), _model(True)]
    x, y = _data(12, seq)
    groups = _groups(12, 3)
    opts = [Balancer(torch.optim.SGD(m.parameters(), lr=1.0), plugins=["upgrad"], model=m) for m in models]

    def once():
        opts[0].backward_samples(_losses(models[0], x, y), group=groups)
        opts[0].step()

    def twice():
        opts[1].backward_samples(_losses(models[1], x[:5], y[:5]), group=groups[:5])
        opts[1].backward_samples(_losses(models[1], x[5:], y[5:]), group=groups[5:])
        opts[1].step()

    ref, got = _sgd_update(models[0], once), _sgd_update(models[1], twice)
    torch.testing.assert_close(opts[1].last_stats.gram, opts[0].last_stats.gram, **TOL)
    torch.testing.assert_close(opts[1].last_stats.losses, opts[0].last_stats.losses, **TOL)
    torch.testing.assert_close(got, ref, **TOL)


def test_accumulation_is_exact(path):
    model = _model(True)
    x, y = _data(12, None)
    groups = _groups(12, 3)
    names, rows = _reference(model, x, y, groups)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)

    def run():
        opt.backward_samples(_losses(model, x[:7], y[:7]), group=groups[:7])
        opt.backward_samples(_losses(model, x[7:], y[7:]), group=groups[7:])
        opt.step()

    update = _sgd_update(model, run)
    torch.testing.assert_close(opt.last_stats.gram, rows @ rows.T, **TOL)
    torch.testing.assert_close(update, rows.sum(0), **TOL)


def test_ragged_sequence_accumulation_is_exact(path):
    model = _model(False)
    (x1, y1), (x2, y2) = _data(5, 3, seed=1), _data(4, 2, seed=2)
    g1, g2 = ["a", "b", "a", "c", "b"], ["c", "a", "b", "b"]
    params = list(model.parameters())
    rows = []
    for name in ("a", "b", "c"):
        m1, m2 = torch.tensor([g == name for g in g1]), torch.tensor([g == name for g in g2])
        loss = _losses(model, x1, y1)[m1].sum() + _losses(model, x2, y2)[m2].sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    rows = torch.stack(rows)
    opt = Balancer(torch.optim.SGD(params, lr=1.0), model=model)

    def run():
        opt.backward_samples(_losses(model, x1, y1), group=g1)
        opt.backward_samples(_losses(model, x2, y2), group=g2)
        opt.step()

    update = _sgd_update(model, run)
    torch.testing.assert_close(opt.last_stats.gram, rows @ rows.T, **TOL)
    torch.testing.assert_close(update, rows.sum(0), **TOL)
    assert opt.last_stats.backward_calls == (2, 2, 2)


def test_ungrouped_gradient_is_added():
    model = _model(True)
    x, y = _data(8, None)
    groups = _groups(8, 2)
    _, rows = _reference(model, x, y, groups)
    params = list(model.parameters())
    extra = torch.autograd.grad(model(x).square().sum(), params)
    opt = Balancer(torch.optim.SGD(params, lr=1.0), model=model)

    def run():
        model(x).square().sum().backward()
        opt.backward_samples(_losses(model, x, y), group=groups)
        opt.step()

    update = _sgd_update(model, run)
    torch.testing.assert_close(update, rows.sum(0) + torch.cat([e.flatten() for e in extra]), **TOL)


def test_no_weight_gradient_is_accumulated_by_the_capture():
    model = _model(True)
    x, y = _data(8, None)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    opt.backward_samples(_losses(model, x, y), group="all")
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_discards_pending_capture():
    model = _model(True)
    x, y = _data(8, None)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    opt.backward_samples(_losses(model, x, y), group=_groups(8, 2))
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.last_stats is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with opt.group("g"):  # the step is free for group blocks again
        _losses(model, x, y).sum().backward()
    opt.step()


def test_nonfinite_sample_loss_zeroes_its_group():
    model = _model(True)
    x, y = _data(9, None)
    groups = ["a"] * 3 + ["bad"] * 3 + ["c"] * 3
    names, rows = _reference(model, x, y, groups)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)

    def run():
        losses = _losses(model, x, y)
        poison = torch.ones(9, dtype=torch.float64)
        poison[4] = float("nan")
        with pytest.warns(NonFiniteGradientWarning, match="bad"):
            opt.backward_samples(losses * poison, group=groups)
            opt.step()

    update = _sgd_update(model, run)
    assert opt.last_stats.weights.tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(update, rows[0] + rows[2], **TOL)


def test_state_dict_resume_is_unaffected():
    torch.manual_seed(0)
    model = _model(True)
    opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-2), plugins=["task_norm"], model=model)
    groups = _groups(8, 2)

    def step(m, o, seed):
        x, y = _data(8, None, seed=seed)
        o.backward_samples(_losses(m, x, y), group=groups)
        o.step()
        o.zero_grad()

    step(model, opt, 0)
    clone = copy.deepcopy(model)
    resumed = Balancer(torch.optim.Adam(clone.parameters(), lr=1e-2), plugins=["task_norm"], model=clone)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for seed in (1, 2):
        step(model, opt, seed)
        step(clone, resumed, seed)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "samples" not in str(opt.state_dict()["balancer"])


def test_grad_scaler_folds_the_scale():
    models = [_model(True).float(), _model(True).float()]
    x, y = (t.float() for t in _data(8, None))
    groups = _groups(8, 2)
    opts = [Balancer(torch.optim.SGD(m.parameters(), lr=0.1), plugins=["task_norm"], model=m) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opts[0].backward_samples(_losses(models[0], x, y), group=groups)
    opts[0].step()
    opts[1].backward_samples(scaler.scale(_losses(models[1], x, y)), group=groups)
    scaler.step(opts[1])
    scaler.update()
    torch.testing.assert_close(opts[1].last_stats.norms, opts[0].last_stats.norms, rtol=1e-5, atol=0)
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seq", [None, 2])
def test_one_sample_call_per_task_on_a_shared_trunk_equals_the_per_task_groups(path, seq):
    """Several calls on one forward share each trunk layer's saved input: the Gram uses it once per
    family of calls, and must still equal the per-task reference (and the combination too)."""
    x, _ = _data(10, seq, d_in=6)
    targets = [torch.randn(10, generator=torch.Generator().manual_seed(t), dtype=torch.float64) for t in range(3)]

    def task_losses(model):
        features = model.trunk(x)
        outs = [head(features).reshape(10, -1).sum(1) for head in model.heads]
        return [(out - y) ** 2 for out, y in zip(outs, targets, strict=True)]

    ref_model, model = _Heads().double(), _Heads().double()
    ref = Balancer(torch.optim.SGD(ref_model.parameters(), lr=1.0), plugins=["upgrad"])
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["upgrad"], model=model)

    def per_task():
        ref.backward({f"t{t}": loss.sum() for t, loss in enumerate(task_losses(ref_model))})
        ref.step()

    def samples():
        losses = task_losses(model)
        for t, loss in enumerate(losses):
            opt.backward_samples(loss, group=f"t{t}", retain_graph=t < len(losses) - 1)
        opt.step()

    want, got = _sgd_update(ref_model, per_task), _sgd_update(model, samples)
    torch.testing.assert_close(opt.last_stats.gram, ref.last_stats.gram, **TOL)
    torch.testing.assert_close(got, want, **TOL)
