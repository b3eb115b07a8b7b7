"""What the layer capture refuses (unsupported layers and layouts, mixed capture modes) and what a
refusal leaves behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from balancer import Balancer, CaptureError
from tests.balancer.capture.layer_capture_cases import (
    _data,
    _Heads,
    _hook_count,
    _losses,
    _model,
    _task_losses,
    _WithNorm,
)


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


def test_a_sequence_first_layout_is_refused():
    """[T, B, d] inputs flatten to T·B rows like [B, T, d] ones; the layer's output view tells them apart."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x = torch.randn(5, 2, 3, dtype=torch.float64)  # T = 5 steps of B = 2 samples
    losses = model(x).pow(2).sum((0, 2))  # [B]
    with pytest.raises(CaptureError, match=r"shape \(5, 2, \d\) for 2 samples.*batch dimension must lead"):
        opt.backward_samples(losses, group=["a", "b"])


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
