"""``opt.backward_samples`` and ``opt.backward_tasks``: the layer capture equals the per-group reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import balancer.capture.layer_gram as layer_gram
from balancer import Balancer, CaptureError, NonFiniteGradientWarning

TOL = dict(rtol=1e-10, atol=1e-10)


def _model(bias: bool, widths=(6, 9, 5, 3), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        layers += [nn.Linear(a, b, bias=bias or i == 1), nn.Tanh() if i % 2 else nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _data(batch: int, seq: int | None, d_in: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, d_in) if seq is None else (batch, seq, d_in)
    return torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randn(
        batch, generator=gen, dtype=torch.float64
    )


def _losses(model: nn.Module, x, y):
    out = model(x)
    return (out.reshape(x.shape[0], -1).sum(1) - y) ** 2


def _groups(batch: int, k: int) -> list[str]:
    sizes = [1 + i for i in range(k)]  # unequal sizes
    names = [f"g{i}" for i in range(k) for _ in range(sizes[i])]
    return (names * batch)[:batch] if len(names) < batch else names[:batch]


def _reference(model, x, y, groups):
    """Per-group gradient rows [k, n] from separate autograd.grad calls, in first-appearance order."""
    params = list(model.parameters())
    names = list(dict.fromkeys(groups))
    losses = _losses(model, x, y)
    rows = []
    for name in names:
        mask = torch.tensor([g == name for g in groups])
        grads = torch.autograd.grad(losses[mask].sum(), params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return names, torch.stack(rows)


def _sgd_update(model, run):
    """Runs one step with SGD(lr=1); returns the flat update (= the gradient handed to SGD)."""
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    run()
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(params=layer_gram.FORMS)
def path(request, monkeypatch):
    """Every weight's Gram in one form: each must be exact on its own."""
    monkeypatch.setattr(layer_gram, "choose_form", lambda *a: request.param)
    return request.param


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


class _WithNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.fc(x))


@pytest.mark.parametrize("norm", [nn.LayerNorm(4), nn.Conv1d(1, 1, 1)], ids=["layernorm", "conv"])
def test_unsupported_parameter_is_named(norm):
    model = _WithNorm(norm)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    with pytest.raises(CaptureError, match=r"norm\.weight \((LayerNorm|Conv1d)\)"):
        opt.backward_samples(model.fc(torch.randn(3, 4)).sum(1), group="a")


def test_weight_used_outside_linear_is_refused():
    model = _model(True)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    x, y = _data(4, None)
    losses = _losses(model, x, y) + model[0].weight.square().sum()
    with pytest.raises(CaptureError, match=r"0\.weight"):
        opt.backward_samples(losses, group="a")


def test_missing_model_and_bad_arguments():
    model = _model(True)
    x, y = _data(4, None)
    with pytest.raises(CaptureError, match="model=model"):
        Balancer(torch.optim.SGD(model.parameters(), lr=1.0)).backward_samples(_losses(model, x, y), group="a")
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    with pytest.raises(CaptureError, match="one group per sample"):
        opt.backward_samples(_losses(model, x, y), group=["a", "b"])
    with pytest.raises(CaptureError, match=r"\[B\] tensor"):
        opt.backward_samples(_losses(model, x, y).sum(), group="a")


def test_mixing_with_group_blocks_is_refused():
    model = _model(True)
    x, y = _data(4, None)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    with opt.group("a"):
        _losses(model, x, y).sum().backward()
    with pytest.raises(CaptureError, match="mixed"):
        opt.backward_samples(_losses(model, x, y), group="b")
    opt.zero_grad()
    opt.backward_samples(_losses(model, x, y), group="b")
    with pytest.raises(CaptureError, match="backward_samples"), opt.group("a"):
        pass
    with pytest.raises(CaptureError, match="backward_samples"):
        opt.backward({"a": _losses(model, x, y).sum()})


def _hook_count(model: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n)) for m in model.modules() for n in names)


def test_no_hooks_left_after_call_and_after_error():
    model = _model(True)
    x, y = _data(4, None)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    opt.backward_samples(_losses(model, x, y), group="a")
    assert _hook_count(model) == 0
    opt.zero_grad()
    with pytest.raises(CaptureError):
        opt.backward_samples(_losses(model, x, y) + model[0].weight.sum(), group="a")
    assert _hook_count(model) == 0


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


def test_a_sequence_first_layout_is_refused():
    """[T, B, d] inputs flatten to T·B rows like [B, T, d] ones; the layer's output view tells them apart."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x = torch.randn(5, 2, 3, dtype=torch.float64)  # T = 5 steps of B = 2 samples
    losses = model(x).pow(2).sum((0, 2))  # [B]
    with pytest.raises(CaptureError, match=r"shape \(5, 2, \d\) for 2 samples.*batch dimension must lead"):
        opt.backward_samples(losses, group=["a", "b"])


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(7, 2) for _ in range(3))


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


# -- backward_tasks ------------------------------------------------------------------------------
def _task_losses(model: _Heads, x, seq):
    """Three scalar task losses on one trunk forward (each head reaches only its own task)."""
    features = model.trunk(x)
    gen = torch.Generator().manual_seed(7)
    targets = [torch.randn(x.shape[0], generator=gen, dtype=torch.float64) for _ in model.heads]
    outs = [head(features).reshape(x.shape[0], -1).sum(1) for head in model.heads]
    return {f"t{t}": ((out - y) ** 2).mean() for t, (out, y) in enumerate(zip(outs, targets, strict=True))}


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


def test_backward_tasks_errors():
    model = _Heads().double()
    x, _ = _data(4, None, d_in=6)
    with pytest.raises(CaptureError, match="backward_tasks needs the model"):
        Balancer(torch.optim.SGD(model.parameters(), lr=1.0)).backward_tasks(_task_losses(model, x, None))
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    with pytest.raises(CaptureError, match="non-empty dict"):
        opt.backward_tasks({})
    with pytest.raises(CaptureError, match="must be a scalar"):
        opt.backward_tasks({"a": model.trunk(x).sum(1)})
    with pytest.raises(CaptureError, match="does not require grad"):
        opt.backward_tasks({"a": x.sum()})
    with opt.group("a"):
        model.trunk(x).sum().backward()
    with pytest.raises(CaptureError, match="backward_tasks cannot be mixed"):
        opt.backward_tasks(_task_losses(model, x, None))
    opt.zero_grad()
    opt.backward_tasks(_task_losses(model, x, None))
    with pytest.raises(CaptureError, match="backward_tasks"), opt.group("a"):
        pass
    assert _hook_count(model) == 0


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


def test_a_parameter_group_added_later_is_checked():
    """The layer owners are cached between steps; a new trained parameter invalidates the cache."""
    model = _WithNorm(nn.LayerNorm(4))
    model.norm.requires_grad_(False)
    opt = Balancer(torch.optim.SGD(model.fc.parameters(), lr=1.0), model=model)
    x = torch.randn(3, 4)
    opt.backward_tasks({"a": model(x).sum()})
    opt.step()
    model.norm.requires_grad_(True)
    opt.add_param_group({"params": list(model.norm.parameters())})
    with pytest.raises(CaptureError, match=r"norm\.weight \(LayerNorm\)"):
        opt.backward_tasks({"a": model(x).sum()})


def test_other_backends_are_refused():
    """Cross-rank Gram terms would need every rank's layer inputs: only the local backend is supported."""
    from balancer.capture.local import LocalBackend

    class Sharded(LocalBackend):  # stands for the DDP / FSDP / DeepSpeed backends
        pass

    model = _Heads().double()
    x, _ = _data(4, None, d_in=6)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = Balancer(sgd, model=model, backend=Sharded(sgd))
    with pytest.raises(CaptureError, match="local backend only.*Sharded"):
        opt.backward_tasks(_task_losses(model, x, None))
    with pytest.raises(CaptureError, match="local backend only.*Sharded"):
        opt.backward_samples(model.trunk(x).sum(1), group="a")


def test_a_refused_capture_leaves_the_step_untouched():
    """The row count is checked after the backward pass; a refusal must not leave groups or calls behind."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x = torch.randn(3, 3, dtype=torch.float64)
    losses = model(x).sum(1)[:2] + model(x[:1]).sum()  # two calls of 3 and 1 rows for 2 samples
    with pytest.raises(CaptureError, match=r"[13] output rows for 2 samples"):
        opt.backward_samples(losses, group=["a", "b"])
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.last_stats is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.backward_samples(model(x).sum(1), group=["a", "b", "a"])
    opt.step()
    assert opt.last_stats.names == ("a", "b")
