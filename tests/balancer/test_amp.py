"""GradScaler.step(balancer): unscaled statistics, exact updates, overflow skips and back-off."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, CaptureError

SCALE = 2.0**12


def _inner(params, fused: bool):
    return torch.optim.AdamW(params, lr=1e-2, fused=fused, foreach=None if fused else False)


def _scaled_step(model, opt, scaler, batches, group_loss, poison: str | None = None):
    for name, batch in batches.items():
        with opt.group(name):
            loss = group_loss(model, batch)
            if name == poison:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
    result = scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return result


@pytest.mark.parametrize("fused", [False, True])
def test_scaled_balancer_matches_unscaled_balancer(fused, make_model, make_batches, group_loss):
    ref, amp = make_model(), make_model()
    ref_opt = Balancer(_inner(ref.parameters(), fused), plugins=["task_norm"])
    amp_opt = Balancer(_inner(amp.parameters(), fused), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    for step in range(3):
        batches = make_batches(seed=step)
        for name, batch in batches.items():
            with ref_opt.group(name):
                group_loss(ref, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        _scaled_step(amp, amp_opt, scaler, batches, group_loss)
        # Statistics are of the unscaled gradients.
        torch.testing.assert_close(amp_opt.last_stats.norms, ref_opt.last_stats.norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(amp_opt.last_stats.weights, ref_opt.last_stats.weights, rtol=1e-6, atol=0)
    for a, b in zip(ref.parameters(), amp.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_overflow_in_one_group_skips_step_and_backs_off(fused, make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(_inner(model.parameters(), fused), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, backoff_factor=0.5, growth_interval=1000)
    _scaled_step(model, opt, scaler, make_batches(seed=0), group_loss)
    params = [p.detach().clone() for p in model.parameters()]
    adam_state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    plugin_state = opt.plugin_states["task_norm"]
    last = opt.last_stats

    result = _scaled_step(model, opt, scaler, make_batches(seed=1), group_loss, poison="g1")

    assert result is None
    assert scaler.get_scale() == SCALE / 2  # the scaler saw the overflow
    for before, p in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, p)
    for key, value in opt.state[next(model.parameters())].items():
        assert torch.equal(value, adam_state[key])
    assert opt.plugin_states["task_norm"] is plugin_state or opt.plugin_states["task_norm"] == plugin_state
    assert opt.plugin_states["task_norm"]["updates"] == 1
    assert opt.last_stats is last
    # Training continues normally afterwards.
    _scaled_step(model, opt, scaler, make_batches(seed=2), group_loss)
    assert opt.plugin_states["task_norm"]["updates"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflow_in_ungrouped_gradients_skips_step(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(_inner(model.parameters(), False), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, backoff_factor=0.5)
    batches = make_batches()
    with opt.group("g0"):
        scaler.scale(group_loss(model, batches["g0"])).backward()
    scaler.scale(group_loss(model, batches["g1"]) * float("inf")).backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler.step(opt) is None
    scaler.update()
    assert scaler.get_scale() == SCALE / 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_without_groups_scaler_unscales_plain_gradients(make_model, make_batches, group_loss):
    ref, amp = make_model(), make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    amp_opt = Balancer(torch.optim.SGD(amp.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    batch = make_batches()["g0"]
    group_loss(ref, batch).backward()
    ref_opt.step()
    scaler.scale(group_loss(amp, batch)).backward()
    scaler.step(amp_opt)
    scaler.update()
    for a, b in zip(ref.parameters(), amp.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_explicit_unscale_before_step_is_refused(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(_inner(model.parameters(), False))
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with opt.group("g0"):
        scaler.scale(group_loss(model, make_batches()["g0"])).backward()
    scaler.unscale_(opt)
    with pytest.raises(CaptureError, match="unscale_"):
        scaler.step(opt)
