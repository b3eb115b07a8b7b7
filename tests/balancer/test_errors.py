"""Bad input gets a clear error, and nothing is lost: parameters stay untouched on refusal."""

from __future__ import annotations

import warnings

import pytest
import torch

from balancer import (
    Balancer,
    CaptureError,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    Plugin,
    PluginError,
)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, snapshot):
    return all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters(), strict=True))


def test_construction_errors(model):
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        Balancer(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="wrap the inner optimizer once"):
        Balancer(Balancer(inner))
    with pytest.raises(ValueError, match="on_nonfinite"):
        Balancer(inner, on_nonfinite="ignore")


@pytest.mark.parametrize("name", ["", "   ", 3, None])
def test_group_name_must_be_a_non_empty_string(name, model):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CaptureError, match="non-empty string"), opt.group(name):
        pass


@pytest.mark.parametrize("second", ["a", "b"])
def test_nested_or_repeated_group_blocks(second, model):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    with opt.group("a"):
        with pytest.raises(CaptureError, match=f"Cannot enter group `{second}` inside group `a`"), opt.group(second):
            pass
    assert opt.backend.active is None


def test_step_and_zero_grad_inside_a_group(model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    with opt.group("a"):
        group_loss(model, batches["g0"]).backward()
        with pytest.raises(CaptureError, match="step\\(\\) called inside group `a`"):
            opt.step()
        with pytest.raises(CaptureError, match="zero_grad\\(\\) called inside group `a`"):
            opt.zero_grad()


def test_exception_inside_a_group_block_restores_gradients(model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="boom"), opt.group("a"):
        group_loss(model, batches["g0"]).backward()
        raise RuntimeError("boom")
    assert opt.backend.active is None
    assert all(p.grad is None for p in model.parameters())  # the ungrouped gradients are back
    assert opt.backend.buffers[0].row(0).abs().sum() > 0  # what the backward produced is kept


def test_backward_rejects_non_scalar_and_detached_losses(model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches["g0"]
    with pytest.raises(CaptureError, match=r"must be a scalar. Found shape \(8, 3\)"):
        opt.backward({"a": (model(x) - y) ** 2})
    with pytest.raises(CaptureError, match="does not require grad"):
        opt.backward({"a": torch.tensor(1.0)})
    with pytest.raises(CaptureError, match="non-empty dict"):
        opt.backward({})


def test_model_parameter_missing_from_the_optimizer(model, batches, group_loss):
    first_layer_only = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(CaptureError, match=r"2 trainable parameter\(s\).*2\.weight, 2\.bias"):
        Balancer(first_layer_only, model=model)
    opt = Balancer(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(CaptureError, match=r"2 tensor\(s\) that require grad.*\(3, 16\)"):
        opt.backward({"a": group_loss(model, batches["g0"])})


class _Returns(Plugin):
    name = "returns"

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def init(self):
        return {"calls": 0}

    def update(self, stats, weights, state):
        return self.fn(weights), {"calls": state["calls"] + 1}


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda w: w[:1], r"Plugin `returns` returned weights of shape \(1,\) for 3 groups"),
        (lambda w: w * float("nan"), "Plugin `returns` returned non-finite weights"),
        (lambda w: w.to("meta"), "Plugin `returns` returned weights on `meta`"),
        (lambda w: w.long(), "Plugin `returns` returned weights of dtype torch.int64"),
        (lambda w: [1.0, 1.0, 1.0], "Plugin `returns` returned `list`"),
        (lambda w: 1 / 0, "Plugin `returns` failed in update\\(\\): ZeroDivisionError"),
    ],
)
def test_bad_plugin_output_refuses_the_step(fn, message, model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm", _Returns(fn)])
    for name, batch in batches.items():
        with opt.group(name):
            group_loss(model, batch).backward()
    before = _snapshot(model)
    with pytest.raises(PluginError, match=message):
        opt.step()
    assert _unchanged(model, before)
    assert opt.plugin_states["returns"] == {"calls": 0}
    assert opt.plugin_states["task_norm"]["updates"] == 0
    assert opt.backend.names == ("g0", "g1", "g2")  # nothing lost: the groups are still pending


def _nan_group_step(opt, model, batches, group_loss):
    for name, batch in batches.items():
        with opt.group(name):
            loss = group_loss(model, batch)
            (loss * float("nan") if name == "g1" else loss).backward()
    opt.step()


def test_nonfinite_group_gets_weight_zero_with_a_warning(make_model, batches, group_loss):
    model, ref = make_model(), make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("task_norm", {"beta": 0.5})])
    ref_opt = Balancer(torch.optim.SGD(ref.parameters(), lr=0.1), plugins=[("task_norm", {"beta": 0.5})])
    with pytest.warns(NonFiniteGradientWarning, match=r"group\(s\) \['g1'\]"):
        _nan_group_step(opt, model, batches, group_loss)
    for name in ("g0", "g2"):
        with ref_opt.group(name):
            group_loss(ref, batches[name]).backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.last_stats.weights[1].item() == 0.0
    assert set(opt.plugin_states["task_norm"]["ema_norms"]) == {"g0", "g2"}  # g1 treated as absent


def test_nonfinite_group_raises_when_asked(model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="raise")
    before = _snapshot(model)
    with pytest.raises(NonFiniteGradientError, match=r"group\(s\) \['g1'\]"):
        _nan_group_step(opt, model, batches, group_loss)
    assert _unchanged(model, before)


def test_mixed_dtypes_get_one_buffer_each_and_stay_exact(group_loss):
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2).double())

    def loss(m, x, scale):
        return (m[1](m[0](x).double()) ** 2).mean() * scale

    ref, bal = build(), build()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = Balancer(torch.optim.SGD(bal.parameters(), lr=0.1))
    x = torch.randn(6, 4)
    (loss(ref, x, 1.0) + loss(ref, x, 3.0)).backward()
    ref_opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.backward({"a": loss(bal, x, 1.0), "b": loss(bal, x, 3.0)})
        opt.step()
    assert {(b.dtype, b.n) for b in opt.backend.buffers} == {(torch.float32, 25), (torch.float64, 12)}
    for a, b in zip(ref.parameters(), bal.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # 'b' is exactly 3x 'a', so the Gram matrix is [[n², 3n²], [3n², 9n²]].
    gram = opt.last_stats.gram
    torch.testing.assert_close(gram[1, 1], 9 * gram[0, 0])
    torch.testing.assert_close(gram[0, 1], 3 * gram[0, 0])
