"""Combine rules through a real step: the update is ``ungrouped + rule(w ∘ rows)`` computed from the
group rows (float64 references built from ``torch.autograd.grad``), the global coordinate index
runs over every optimizer parameter in order, clipping measures the update itself, dropped groups
are left out, a resumed run draws the same numbers, and misuse is refused."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from balancer import Balancer, CaptureError, ConfigError, GramWeighting, PluginError, SplitHalf
from balancer.contract.combine import Columns, counter_uniform
from balancer.plugins.graddrop import GradDrop
from balancer.plugins.trimmed_mean import TrimmedMean

GROUPS = ("a", "b", "c", "d")


class Triple(GramWeighting):
    """Weights 1, 2, 3, … by position: shows that earlier weights scale the rows."""

    name = "triple_test"

    def weigh(self, stats, state):
        return torch.arange(1, stats.num_groups + 1, dtype=torch.float64, device=stats.gram.device), state


class Boom(TrimmedMean):
    name = "boom_test"

    def combine(self, rows, columns, state):
        raise RuntimeError("boom")


class InOwnDtype(torch.nn.Module):
    """A layer that may keep another dtype than the model's: casts its input, returns float64."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(self.layer.weight.dtype)).double()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), InOwnDtype(torch.nn.Linear(7, 3))).double()
    model[0].bias.requires_grad_(False)  # frozen, yet counted in the global index
    return model


def _batch(name: str, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + GROUPS.index(name) + 1)
    scale = 10.0 ** GROUPS.index(name)  # group norms spread over 3 orders of magnitude
    return torch.randn(6, 5, generator=gen, dtype=torch.float64), scale * torch.randn(
        6, 3, generator=gen, dtype=torch.float64
    )


def _loss(model: torch.nn.Module, name: str, step: int = 0) -> torch.Tensor:
    x, y = _batch(name, step)
    return torch.nn.functional.mse_loss(model(x), y)


def _rows(model: torch.nn.Module, names=GROUPS, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k, N]`` group gradients over every parameter (zeros for the frozen one) and the ungrouped one."""
    params = list(model.parameters())

    def flat(loss: torch.Tensor) -> torch.Tensor:
        trained = [p for p in params if p.requires_grad]
        grads = iter(torch.autograd.grad(loss, trained))
        return torch.cat([next(grads).reshape(-1) if p.requires_grad else torch.zeros(p.numel()) for p in params])

    rows = torch.stack([flat(_loss(model, n, step)) for n in names])
    return rows, flat(0.3 * _loss(model, "b", step + 50))


def _step(opt: Balancer, model: torch.nn.Module, names=GROUPS, step: int = 0) -> torch.Tensor:
    """One step with SGD(lr=1): returns the update the inner optimizer applied, flattened."""
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    (0.3 * _loss(model, "b", step + 50)).backward()
    for name in names:
        with opt.group(name):
            _loss(model, name, step).backward()
    opt.step()
    opt.zero_grad()
    return before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _whole(n: int) -> Columns:
    return Columns(0, n, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))


def _graddrop_reference(rows: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """The paper's Algorithm 1 in float64, U from the counter-based draw at global index j."""
    u = counter_uniform(seed, step, torch.arange(rows.shape[1]))
    p = 0.5 * (1 + rows.sum(0) / rows.abs().sum(0))
    mask = ((p > u) & (rows > 0)) | ((p < u) & (rows < 0))
    return (rows * mask).sum(0)


def test_trimmed_mean_update_is_the_trimmed_mean_of_the_weighted_rows():
    model = _model()
    rows, ungrouped = _rows(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[Triple(), TrimmedMean(trim_number=1)])
    update = _step(opt, model)
    weighted = rows * torch.arange(1.0, 5.0, dtype=torch.float64)[:, None]
    expected = ungrouped + weighted.sort(0).values[1:3].mean(0)
    torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    gemv = ungrouped + weighted.sum(0)  # what the plain combination would have written
    assert (update - gemv).abs().max() > 1e-3 * gemv.abs().max()


def test_graddrop_update_uses_the_global_index_over_every_parameter():
    model = _model()
    model[2].float()  # two flat buffers (float64, float32), in optimizer order 0, 1 then 2, 3
    rows, ungrouped = _rows(copy.deepcopy(model).double())
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[("graddrop", {"seed": 5})])
    update = _step(opt, model)
    expected = ungrouped + _graddrop_reference(rows, seed=5, step=0)
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    other_seed = ungrouped + _graddrop_reference(rows, seed=6, step=0)
    assert (update - other_seed).abs().max() > 1e-2 * expected.abs().max()  # the draws matter


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("how", ["max_grad_norm", "call"])
def test_clipping_measures_the_combined_update(how, norm_type):
    model = _model()
    rows, ungrouped = _rows(model)
    max_norm = 0.5
    clip = {"max_grad_norm": max_norm, "norm_type": norm_type} if how == "max_grad_norm" else {}
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[TrimmedMean()], **clip)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    (0.3 * _loss(model, "b", 50)).backward()
    for name in GROUPS:
        with opt.group(name):
            _loss(model, name).backward()
    norm = opt.clip_grad_norm_(max_norm, norm_type) if how == "call" else None
    opt.step()
    update = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    unclipped = ungrouped + rows.sort(0).values[1:3].mean(0)
    true_norm = torch.linalg.vector_norm(unclipped, norm_type)
    coef = min(1.0, max_norm / (float(true_norm) + 1e-6))
    assert coef < 0.1  # the clip engages
    torch.testing.assert_close(opt.last_stats.grad_norm, true_norm, rtol=1e-12, atol=0.0)
    if norm is not None:
        torch.testing.assert_close(norm, true_norm, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(update, coef * unclipped, rtol=1e-10, atol=1e-12)
    gram_norm = torch.linalg.vector_norm(ungrouped + rows.sum(0))  # wᵀGw's norm: not the update's
    assert abs(float(gram_norm) - float(true_norm)) > 0.1 * float(true_norm)


def test_non_finite_group_is_left_out_of_the_rule():
    model = _model()
    rows, ungrouped = _rows(model, names=("a", "b", "c"))
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[TrimmedMean()])
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    (0.3 * _loss(model, "b", 50)).backward()
    for name in ("a", "bad", "b", "c"):
        with opt.group(name):
            (_loss(model, name if name != "bad" else "d") * float("nan")).backward() if name == "bad" else (
                _loss(model, name).backward()
            )
    with pytest.warns(Warning, match="bad"):
        opt.step()
    update = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = ungrouped + rows.sort(0).values[1]  # the median of the 3 finite groups, not of 4 with a zero
    torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def test_resume_draws_the_same_numbers():
    model = _model()
    twin = copy.deepcopy(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.01), plugins=[Triple(), GradDrop(seed=2)])
    straight = [_step(opt, model, step=t) for t in range(4)]
    opt_a = Balancer(torch.optim.SGD(twin.parameters(), lr=0.01), plugins=[Triple(), GradDrop(seed=2)])
    first = [_step(opt_a, twin, step=t) for t in range(2)]
    buffer = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "model": twin.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model()
    fresh.load_state_dict(saved["model"])
    opt_b = Balancer(torch.optim.SGD(fresh.parameters(), lr=0.01), plugins=[Triple(), GradDrop(seed=2)])
    opt_b.load_state_dict(saved["opt"])
    resumed = first + [_step(opt_b, fresh, step=t) for t in range(2, 4)]
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(straight[2], straight[3])


def test_a_failing_rule_leaves_the_step_retryable():
    model = _model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1.0), plugins=[Boom()])
    before = [p.detach().clone() for p in model.parameters()]
    for name in GROUPS:
        with opt.group(name):
            _loss(model, name).backward()
    with pytest.raises(PluginError, match="boom_test.*combine"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert opt._pending.source.names == GROUPS  # still pending


def test_refusals():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match="one"):
        Balancer(torch.optim.SGD(params, lr=0.1), plugins=["graddrop", "trimmed_mean"])
    with pytest.raises(ConfigError, match="last plugin"):
        Balancer(torch.optim.SGD(params, lr=0.1), plugins=["trimmed_mean", "task_norm"])
    with pytest.raises(ConfigError, match="inside"):
        Balancer(torch.optim.SGD(params, lr=0.1), plugins=[SplitHalf(plugins=["graddrop"])])


def test_layer_capture_is_refused():
    model = torch.nn.Linear(4, 2)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["graddrop"], model=model)
    losses = model(torch.randn(4, 4)).pow(2).sum(1)
    opt.backward_samples(losses, group=["a", "a", "b", "b"])
    with pytest.raises(CaptureError, match="layer capture"):
        opt.step()


def test_counter_uniform_is_uniform_and_keyed():
    index = torch.arange(200_000) + (1 << 33)
    u = counter_uniform(3, 7, index)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = len(index) / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.0  # 19 degrees of freedom: p < 1e-3 above 43.8
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01  # neighbours independent
    for other in (counter_uniform(4, 7, index), counter_uniform(3, 8, index)):
        assert float((other == u).double().mean()) < 1e-3
    assert torch.equal(counter_uniform(3, 7, index[5:9]), u[5:9])
