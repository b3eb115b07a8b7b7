"""One step on the test device (``BALANCER_TEST_DEVICE``, default cpu): the groups' gradients, the
stats, the weights and the update stay on the device, and equal the bare optimizer's update."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer


def _setup(make_model, make_batches, device):
    model = make_model(dtype=torch.float64).to(device)
    batches = {g: (x.to(device), y.to(device)) for g, (x, y) in make_batches(dtype=torch.float64).items()}
    return model, batches


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_no_plugin_step_equals_the_bare_optimizer_on_the_device(make_model, make_batches, group_loss, device):
    model, batches = _setup(make_model, make_batches, device)
    reference, _ = _setup(make_model, make_batches, device)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward({g: group_loss(model, b) for g, b in batches.items()})
    opt.step()
    bare = torch.optim.SGD(reference.parameters(), lr=0.1)
    sum(group_loss(reference, b) for b in batches.values()).backward()
    bare.step()
    assert _flat(model).device.type == device.type
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plugins", [["task_norm"], ["upgrad"], ["task_norm", "mgda"]])
def test_stats_and_weights_stay_on_the_device(make_model, make_batches, group_loss, device, plugins):
    model, batches = _setup(make_model, make_batches, device)
    before = _flat(model).clone()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins)
    for name, batch in batches.items():
        with opt.group(name):
            group_loss(model, batch).backward()
    opt.step()
    stats = opt.last_stats
    assert stats.gram.device.type == device.type and stats.weights.device.type == device.type
    assert torch.isfinite(stats.weights).all() and not torch.equal(_flat(model), before)
