"""Clipping the balanced update: ``Balancer(max_grad_norm=...)`` and ``opt.clip_grad_norm_``.

The reference is always the explicit update in float64: the group gradients computed on their
own with ``torch.autograd.grad``, combined with the weights the plugins gave, plus the ungrouped
gradient, then clipped with torch's rule ``min(1, c / (‖u‖ + 1e-6))``. With SGD(lr=1) the
parameter change is the update itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from balancer import Balancer, CaptureError, NonFiniteGradientError, TapPlugin

f64 = torch.float64


def _flat(grads, params):
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def _grad(loss, params):
    return _flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _clipped(update: torch.Tensor, max_norm: float, norm_type: float = 2.0):
    total = torch.linalg.vector_norm(update, norm_type)
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    return update * coef, total, coef


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(f64)


def _data(seed=0, rows=12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=gen, dtype=f64)
    y = torch.randn(rows, 3, generator=gen, dtype=f64) * torch.tensor([1.0, 10.0, 100.0], dtype=f64)
    return x, y


def _per_sample(model, x, y):
    return ((model(x) - y) ** 2).mean(1)


GROUPS = ["a", "b", "a", "c", "b", "c", "a", "a", "b", "c", "c", "b"]


def _capture(path: str, opt: Balancer, model, x, y):
    """Runs one step's capture along ``path``; returns {group: gradient} and the ungrouped gradient
    computed on their own (float64), for the reference."""
    params = list(model.parameters())
    per = _per_sample(model, x, y)
    names = sorted(set(GROUPS))
    losses = {n: per[[i for i, g in enumerate(GROUPS) if g == n]].sum() for n in names}
    expected = {n: _grad(losses[n], params) for n in names}
    penalty = 1e-2 * model[0].weight.pow(2).sum() + model(x[:2]).sum()  # ungrouped terms
    ungrouped = _grad(penalty, params)
    if path == "groups":
        penalty.backward(retain_graph=True)
        for n in names:
            with opt.group(n):
                losses[n].backward(retain_graph=True)
    elif path == "backward":
        opt.backward(losses, retain_graph=True)
        penalty.backward()
    elif path == "samples":
        opt.backward_samples(per, group=GROUPS)
        penalty.backward()
    elif path == "tasks":
        penalty.backward(retain_graph=True)
        opt.backward_tasks(losses)
    else:
        raise AssertionError(path)
    return expected, ungrouped


PATHS = ["groups", "backward", "samples", "tasks"]


def _step_and_check(opt, model, expected, ungrouped, max_norm, norm_type=2.0, call=None):
    before = _params(model)
    total = None
    if call:
        total = opt.clip_grad_norm_(max_norm, norm_type)
    opt.step()
    stats = opt.last_stats
    update = ungrouped + sum(w * expected[n] for n, w in zip(stats.names, stats.weights.tolist(), strict=True))
    clipped, ref_total, coef = _clipped(update, max_norm, norm_type)
    scale = update.abs().max().item()
    torch.testing.assert_close(before - _params(model), clipped, rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(stats.grad_norm, ref_total, rtol=1e-9, atol=0)
    assert stats.clip_coef.item() == pytest.approx(coef, rel=1e-9)
    if total is not None:
        assert torch.equal(total, stats.grad_norm)
    return ref_total.item(), coef


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["max_grad_norm", "clip_grad_norm_"])
def test_clip_equals_clipping_the_explicit_update(path, how):
    model = _model()
    kwargs = {"model": model} if path in ("samples", "tasks") else {}
    max_norm = 0.5
    if how == "max_grad_norm":
        inner = torch.optim.SGD(model.parameters(), lr=1.0)
        opt = Balancer(inner, plugins=["task_norm"], max_grad_norm=max_norm, **kwargs)
    else:
        opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["task_norm"], **kwargs)
    for step in range(2):
        expected, ungrouped = _capture(path, opt, model, *_data(seed=step))
        total, coef = _step_and_check(opt, model, expected, ungrouped, max_norm, call=how == "clip_grad_norm_")
        assert total > max_norm and coef < 0.2  # the clip engaged
        opt.zero_grad()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm_type", [1.0, math.inf, 3.0])
def test_other_norm_types(path, norm_type):
    model = _model()
    kwargs = {"model": model} if path in ("samples", "tasks") else {}
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["task_norm"], **kwargs)
    expected, ungrouped = _capture(path, opt, model, *_data())
    _step_and_check(opt, model, expected, ungrouped, 0.3, norm_type=norm_type, call=True)


def test_a_norm_below_max_norm_is_left_alone():
    model = _model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["task_norm"], max_grad_norm=1e6)
    expected, ungrouped = _capture("groups", opt, model, *_data())
    _, coef = _step_and_check(opt, model, expected, ungrouped, 1e6)
    assert coef == 1.0 and opt.last_stats.clip_coef.item() == 1.0


def test_without_groups_it_is_torch_clip_grad_norm():
    a, b = _model(), _model()
    x, y = _data()
    opt_a = Balancer(torch.optim.SGD(a.parameters(), lr=1.0), max_grad_norm=0.7)
    opt_b = torch.optim.SGD(b.parameters(), lr=1.0)
    _per_sample(a, x, y).sum().backward()
    _per_sample(b, x, y).sum().backward()
    total = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.7)
    opt_a.step()
    opt_b.step()
    assert opt_a.last_stats is None
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # the call form returns torch's total
    opt_d = Balancer(torch.optim.SGD(a.parameters(), lr=1.0))
    opt_d.zero_grad()
    _per_sample(a, x, y).sum().backward()
    c = copy.deepcopy(a)
    ours = opt_d.clip_grad_norm_(0.7)
    _per_sample(c, x, y).sum().backward()
    torch.testing.assert_close(ours, torch.nn.utils.clip_grad_norm_(c.parameters(), 0.7).to(f64), rtol=1e-12, atol=0)
    assert total > 0.7


class _DoubleA(TapPlugin):
    """Doubles the tapped gradient rows of group `a` (a test tap plugin)."""

    name = "double_a"

    def tap(self, event, state, tap_stats):
        return torch.where(event.rows_of("a")[:, None], 2 * event.grad, event.grad), tap_stats


def test_taps_are_part_of_the_clipped_update():
    model = _model()
    x, y = _data()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[_DoubleA(), "task_norm"], max_grad_norm=0.4)
    params = list(model.parameters())
    out = model(x)
    per = ((opt.tap(out, group=GROUPS) - y) ** 2).mean(1)
    names = sorted(set(GROUPS))
    losses = {n: per[[i for i, g in enumerate(GROUPS) if g == n]].sum() for n in names}
    ref_per = _per_sample(model, x, y)
    expected = {
        n: (2.0 if n == "a" else 1.0) * _grad(ref_per[[i for i, g in enumerate(GROUPS) if g == n]].sum(), params)
        for n in names
    }
    opt.backward(losses)
    _step_and_check(opt, model, expected, torch.zeros_like(expected["a"]), 0.4)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_gradscaler_clip_equals_the_unscaled_clip(norm_type, make_model, make_batches, group_loss):
    clip = {"max_grad_norm": 0.5, "norm_type": norm_type}
    ref, amp = make_model(), make_model()
    ref_opt = Balancer(torch.optim.SGD(ref.parameters(), lr=0.1), plugins=["task_norm"], **clip)
    amp_opt = Balancer(torch.optim.SGD(amp.parameters(), lr=0.1), plugins=["task_norm"], **clip)
    call_model = make_model()
    call_opt = Balancer(torch.optim.SGD(call_model.parameters(), lr=0.1), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    call_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(3):
        batches = make_batches(seed=step)
        group_loss(ref, batches["g0"]).backward()  # an ungrouped term too
        for name, batch in batches.items():
            with ref_opt.group(name):
                group_loss(ref, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for model, opt, sc in ((amp, amp_opt, scaler), (call_model, call_opt, call_scaler)):
            sc.scale(group_loss(model, batches["g0"])).backward()
            for name, batch in batches.items():
                with opt.group(name):
                    sc.scale(group_loss(model, batch)).backward()
            if opt is call_opt:
                norm = opt.clip_grad_norm_(0.5, norm_type, scaler=sc)
                torch.testing.assert_close(norm, ref_opt.last_stats.grad_norm, rtol=1e-6, atol=0)
            sc.step(opt)
            sc.update()
            opt.zero_grad()
            torch.testing.assert_close(opt.last_stats.grad_norm, ref_opt.last_stats.grad_norm, rtol=1e-6, atol=0)
            assert ref_opt.last_stats.clip_coef.item() < 0.5
    for model in (amp, call_model):
        for a, b in zip(ref.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradscaler_overflow_after_a_clip_skips_the_step(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, backoff_factor=0.5)
    for name, batch in make_batches().items():
        with opt.group(name):
            loss = group_loss(model, batch)
            scaler.scale(loss * float("inf") if name == "g1" else loss).backward()
    assert torch.isinf(opt.clip_grad_norm_(0.5, scaler=scaler))
    before = _params(model)
    assert scaler.step(opt) is None
    scaler.update()
    assert torch.equal(before, _params(model)) and scaler.get_scale() == 2.0**9


def test_clip_without_scaler_under_a_gradscaler_is_refused(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for name, batch in make_batches().items():
        with opt.group(name):
            scaler.scale(group_loss(model, batch)).backward()
    opt.clip_grad_norm_(1.0)  # measures the scaled gradients
    before = _params(model)
    with pytest.raises(CaptureError, match="scaler=scaler"):
        scaler.step(opt)
    assert torch.equal(before, _params(model))


def test_backward_after_the_clip_is_refused(make_model, make_batches, group_loss):
    model = make_model()
    batches = make_batches()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    for name, batch in batches.items():
        with opt.group(name):
            group_loss(model, batch).backward()
    opt.clip_grad_norm_(1.0)
    with pytest.raises(CaptureError, match="after opt.clip_grad_norm_"):
        with opt.group("g0"):
            pass
    group_loss(model, batches["g0"]).backward()  # ungrouped, after the clip measured the update
    before = _params(model)
    with pytest.raises(CaptureError, match="added gradients after"):
        opt.step()
    assert torch.equal(before, _params(model))
    opt.zero_grad()  # the step can be taken again from scratch
    for name, batch in batches.items():
        with opt.group(name):
            group_loss(model, batch).backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert opt.last_stats.grad_norm is not None


def test_non_finite_total_follows_error_if_nonfinite():
    model = _model()
    x, y = _data()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=["task_norm"])
    (model(x).sum() * float("nan")).backward()  # a NaN ungrouped gradient
    for n in ("a", "b"):
        with opt.group(n):
            _per_sample(model, x, y).sum().backward()
    before = _params(model)
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert torch.equal(before, _params(model))
    assert torch.isnan(opt.clip_grad_norm_(1.0)).item()  # torch's default: no error, a NaN update
    opt.step()
    assert torch.isnan(_params(model)).all()


def test_arguments_are_validated():
    model = _model()
    with pytest.raises(ValueError, match="max_norm"):
        Balancer(torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        Balancer(torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=1.0, norm_type=0)
    with pytest.raises(ValueError, match="would be ignored"):
        Balancer(torch.optim.SGD(model.parameters(), lr=1.0), norm_type=1.0)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=1.0)
    with pytest.raises(CaptureError, match="clip twice"):
        opt.clip_grad_norm_(1.0)
    assert Balancer(torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=1, norm_type="inf").max_grad_norm == 1.0


def test_a_closure_is_clipped_inside_it_not_by_max_grad_norm(make_model, make_batches, group_loss):
    model = make_model()
    batch = make_batches()["g0"]
    opt = Balancer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2), max_grad_norm=0.1)
    with pytest.raises(CaptureError, match="Clip inside the closure"):
        opt.step(lambda: group_loss(model, batch))
    plain = Balancer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2))
    norms = []

    def closure():
        plain.zero_grad()
        loss = group_loss(model, batch)
        loss.backward()
        norms.append(plain.clip_grad_norm_(0.1).item())
        assert torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])) <= 0.1 + 1e-6
        return loss

    plain.step(closure)
    assert norms and max(norms) > 0.1
