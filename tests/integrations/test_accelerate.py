"""accelerate without Trainer: a Balancer prepared with ``balancer.integrations.accelerate.prepare``.

The no-plugin run equals the plain accelerate loop on the summed loss (with and without gradient
accumulation and clipping), ``accelerator.clip_grad_norm_`` clips the balanced update, and a
balanced run equals the plain torch loop with the same Balancer.
"""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, unwrap
from balancer.errors import CaptureError

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from balancer.integrations.accelerate import prepare  # noqa: E402

STEPS = 4
SCALES = {"a": 0.1, "b": 10.0}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: each test starts from a clean one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _batch(step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return {n: (torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen) * s) for n, s in SCALES.items()}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(balanced: bool, plugins=(), gas: int = 1, clip: float | None = None):
    """``STEPS * gas`` micro-batches through accelerate; returns the parameters, the clip norms, the Balancer."""
    model = _model()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gas)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = None
    if balanced:
        model, optimizer = prepare(accelerator, model, Balancer(inner, plugins=list(plugins)))
        opt = unwrap(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, inner)
    norms = []
    for step in range(STEPS * gas):
        with accelerator.accumulate(model):
            batch = _batch(step)
            if opt is not None:
                for name, (x, y) in batch.items():
                    with opt.group(name):
                        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            else:
                accelerator.backward(sum(torch.nn.functional.mse_loss(model(x), y) for x, y in batch.values()))
            if clip is not None and accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], norms, opt


@pytest.mark.parametrize(("gas", "clip"), [(1, None), (1, 0.5), (2, None), (2, 0.5)])
def test_no_plugin_run_equals_the_plain_accelerate_loop(gas, clip):
    plain, plain_norms, _ = _train(False, gas=gas, clip=clip)
    balanced, norms, opt = _train(True, gas=gas, clip=clip)
    for a, b in zip(balanced, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(norms) == len(plain_norms) == (STEPS if clip else 0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(plain_norms), rtol=1e-6, atol=0)
    assert opt.last_stats.names == tuple(SCALES)  # groups were captured, accumulated over gas micro-batches
    assert opt.last_stats.backward_calls == (gas, gas)
    if clip:
        assert opt.last_stats.clip_coef < 1  # the clip engaged on the balanced update


def test_balanced_run_equals_the_plain_torch_loop():
    got, norms, opt = _train(True, ["task_norm"], clip=1.0)
    model = _model()
    ref = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=["task_norm"])
    for step in range(STEPS):
        for name, (x, y) in _batch(step).items():
            with ref.group(name):
                torch.nn.functional.mse_loss(model(x), y).backward()
        ref.clip_grad_norm_(1.0)
        ref.step()
        ref.zero_grad()
    for a, b in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.last_stats.weights, ref.last_stats.weights, rtol=1e-6, atol=0)
    assert norms[-1] == pytest.approx(float(ref.last_stats.grad_norm), rel=1e-6)


def test_clipping_part_of_the_parameters_with_pending_groups_is_refused():
    model = _model()
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepare(accelerator, model, Balancer(torch.optim.SGD(model.parameters(), lr=0.1)))
    opt = unwrap(optimizer)
    x, y = _batch(0)["a"]
    with opt.group("a"):
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
    with pytest.raises(CaptureError, match="only partly the Balancer's"):
        accelerator.clip_grad_norm_(model[0].parameters(), 1.0)
    other = torch.nn.Linear(2, 2)  # parameters the Balancer does not hold still go to accelerate
    other(torch.ones(1, 2)).sum().backward()
    assert float(accelerator.clip_grad_norm_(other.parameters(), 1e9)) > 0
