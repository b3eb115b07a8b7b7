"""The local backend: row views, accumulation, absent groups, ungrouped gradients, exact Gram."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import Balancer, BalancerWarning, CaptureError, Plugin
from balancer.capture.flat_buffer import FlatBuffer


def _flat_grads(model, loss):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
            for g, p in zip(grads, model.parameters(), strict=True)
        ]
    )


def test_first_capture_hands_over_the_gradient_and_later_captures_accumulate_in_place(model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = group_loss(model, batches["g0"])
    expected = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)]
    )
    with opt.group("g0"):
        loss.backward(retain_graph=True)
    buf = opt.backend.buffers[0]
    assert torch.equal(buf.row(0), expected)  # copied once from the gradient autograd produced
    assert all(p.grad is None for p in model.parameters())  # the ungrouped gradients are back
    with opt.group("g0"):
        (block,) = buf.blocks
        start, end = block.data_ptr(), block.data_ptr() + block.numel() * block.element_size()
        assert all(start <= p.grad.data_ptr() < end for p in model.parameters())  # views into the row
        loss.backward()
    torch.testing.assert_close(buf.row(0), 2 * expected)


def test_extra_memory_is_k_rows(model, batches, group_loss):
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    n = sum(p.numel() for p in model.parameters())
    opt.backward({name: group_loss(model, b) for name, b in batches.items()})
    assert opt.backend.extra_bytes() == 3 * n * 4


def test_micro_batches_accumulate_in_the_group_row(make_model, batches, group_loss):
    model = make_model(dtype=torch.float64)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = (t.double() for t in batches["g0"])
    for part in range(2):  # two micro-batches of the same group, in separate blocks
        with opt.group("a"):
            torch.nn.functional.mse_loss(model(x[part * 4 : part * 4 + 4]), y[part * 4 : part * 4 + 4]).backward()
    expected = _flat_grads(
        model, sum(torch.nn.functional.mse_loss(model(x[i * 4 : i * 4 + 4]), y[i * 4 : i * 4 + 4]) for i in range(2))
    )
    torch.testing.assert_close(opt.backend.gram()[0, 0], expected.dot(expected), rtol=1e-12, atol=0)


def test_parameters_without_gradient_contribute_zeros_and_ungrouped_is_unweighted():
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1).double() for _ in range(2)])
    params = [*trunk.parameters(), *heads.parameters()]

    class Fixed(Plugin):
        name = "fixed"

        def update(self, stats, weights, state):
            return weights * torch.tensor([0.5, 4.0], dtype=weights.dtype), state

    opt = Balancer(torch.optim.SGD(params, lr=1.0), plugins=[Fixed()])
    x = torch.randn(5, 3, dtype=torch.float64)
    losses = [heads[i](trunk(x)).pow(2).mean() * (i + 1) for i in range(2)]
    extra = trunk(x).sum() * 0.1
    grads = []
    for loss in [*losses, extra]:
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append([g if g is not None else torch.zeros_like(p) for g, p in zip(got, params, strict=True)])
    before = [p.detach().clone() for p in params]
    extra.backward(retain_graph=True)  # outside any group: added with weight 1
    with opt.group("a"):
        losses[0].backward(retain_graph=True)
    with opt.group("b"):
        losses[1].backward()
    opt.step()
    for i, (p, p0) in enumerate(zip(params, before, strict=True)):
        expected = p0 - (0.5 * grads[0][i] + 4.0 * grads[1][i] + grads[2][i])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    # head 1 has no gradient from group 'a': its part of row 'a' is zero
    cross = sum((ga * gb).sum() for ga, gb in zip(grads[0], grads[1], strict=True))
    torch.testing.assert_close(opt.last_stats.gram[0, 1], cross, rtol=1e-12, atol=0)


def test_groups_in_any_order_and_absent_groups(make_model, batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("task_norm", {"beta": 0.5})])
    for name in ("g2", "g0", "g1"):
        with opt.group(name):
            group_loss(model, batches[name]).backward()
    opt.step()
    opt.zero_grad()
    assert opt.last_stats.names == ("g2", "g0", "g1")
    ema_g1 = opt.plugin_states["task_norm"]["ema_norms"]["g1"]
    for name in ("g0", "g2"):
        with opt.group(name):
            group_loss(model, batches[name]).backward()
    opt.step()
    assert opt.last_stats.names == ("g0", "g2")
    assert opt.last_stats.weights.shape == (2,)
    assert torch.equal(opt.plugin_states["task_norm"]["ema_norms"]["g1"], ema_g1)  # absent: untouched


def test_new_group_mid_training_grows_the_buffer(make_model, batches, group_loss):
    model = make_model(dtype=torch.float64)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward({"g0": group_loss(model, [t.double() for t in batches["g0"]])})
    opt.step()
    opt.zero_grad()
    losses = {n: group_loss(model, [t.double() for t in b]) for n, b in batches.items()}
    expected = [_flat_grads(model, loss) for loss in losses.values()]
    opt.backward(losses)
    gram = opt.backend.gram()
    reference = torch.stack(expected) @ torch.stack(expected).T
    torch.testing.assert_close(gram, reference, rtol=1e-12, atol=1e-14)
    buf = opt.backend.buffers[0]
    assert [b.shape[0] for b in buf.blocks] == [2, 1, 1]  # base + g0, then a block per new row: nothing copied
    assert opt.backend.extra_bytes() == 3 * buf.n * 8
    opt.step()
    assert [b.shape[0] for b in buf.blocks] == [4]  # merged (base + 3 rows) for the next step


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_create_graph_backward_inside_a_group(make_model, batches, group_loss):
    model = make_model(dtype=torch.float64)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = group_loss(model, [t.double() for t in batches["g0"]])
    expected = _flat_grads(model, loss)
    with opt.group("a"):
        loss.backward(create_graph=True)  # autograd accumulates out of place here
    torch.testing.assert_close(opt.backend.gram()[0, 0], expected.dot(expected), rtol=1e-12, atol=0)
    assert not any(b.requires_grad for b in opt.backend.buffers[0].blocks)  # values kept, graph dropped


def test_parameter_added_between_steps_is_balanced(make_model, batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model[0].parameters(), lr=0.1))
    opt.backward({"a": model[0](batches["g0"][0]).pow(2).mean()})
    opt.step()
    opt.add_param_group({"params": list(model[2].parameters())})
    opt.zero_grad()
    opt.backward({"a": group_loss(model, batches["g0"])})
    assert opt.backend.buffers[0].n == sum(p.numel() for p in model.parameters())


def test_low_precision_gram_accumulates_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    opt.backward({"a": model(x).float().pow(2).mean(), "b": model(x * 2).float().mean()})
    rows = torch.stack([opt.backend.buffers[0].row(i) for i in range(2)]).double()
    torch.testing.assert_close(opt.backend.gram(), rows @ rows.T, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    order=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_gram_matches_float64_reference_for_any_capture_order(order, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    inputs = [torch.randn(4, 3, dtype=torch.float64) for _ in order]
    totals: dict[str, torch.Tensor] = {}
    for name, x in zip(order, inputs, strict=True):
        scale = {"a": 1.0, "b": 10.0, "c": 0.01}[name]
        with opt.group(name):
            (model(x).pow(2).mean() * scale).backward()
        grad = _flat_grads(model, model(x).pow(2).mean() * scale)
        totals[name] = totals.get(name, 0) + grad
    names = list(dict.fromkeys(order))
    assert opt.backend.names == tuple(names)
    a = torch.stack([totals[n] for n in names])
    torch.testing.assert_close(opt.backend.gram(), a @ a.T, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("k", "n"), [(1, 5000), (3, 1023), (3, 4097), (8, 300_001), (40, 70_000)])
def test_tiled_gram_product_matches_float64(k, n):
    from balancer.capture.row_gram import gram_of

    a = torch.randn(k, n, generator=torch.Generator().manual_seed(k))
    exact = a.double() @ a.double().T
    torch.testing.assert_close(gram_of(a).double(), exact, rtol=1e-5, atol=1e-3)
    b = torch.randn(2, n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gram_of(a, b).double(), a.double() @ b.double().T, rtol=1e-5, atol=1e-3)


# -- bad input: never silently wrong ---------------------------------------------------------------
def _two_group_norms(scale: float, dtype=torch.float32, **options):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, dtype=dtype))
    opt = Balancer(torch.optim.SGD([p], lr=0.1), **options)
    g = torch.randn(1000, dtype=torch.float64) * scale
    for _ in range(2):  # the second step: base holds the first step's update (not an ungrouped gradient)
        with opt.group("a"):
            (p * g.to(dtype)).sum().backward()
        with opt.group("b"):
            (p * torch.ones(1000, dtype=dtype)).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt, g.to(dtype).double()


@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e-20, 1e20, 1e25, 1e30])
def test_norms_from_1e_minus_30_to_1e30_are_right_and_finite(scale):
    """Float32 Gram entries overflow above ~1e19 and underflow below ~1e-19; the rare-path refinement
    recomputes them in float64 from scaled rows, so no finite gradient is reported non-finite."""
    opt, g = _two_group_norms(scale)
    stats = opt.last_stats
    torch.testing.assert_close(stats.norms[0], g.norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.gram[0, 1], g.sum(), rtol=1e-6, atol=1e-6 * g.norm().item() * 1000**0.5)
    assert stats.weights.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("clip", [{}, {"max_grad_norm": 1e6}], ids=["plain", "clipped"])
@pytest.mark.parametrize(("size", "slow"), [(0.0, False), (1.0, False), (1e-30, True), (1e30, True)])
def test_only_untrustworthy_rows_take_the_slow_path(monkeypatch, size, slow, clip):
    """Zero rows (an all-zero-advantage GRPO group, say) and ordinary rows keep the fast Gram, with
    or without the clip's ungrouped row; only the suspect row is recomputed, not the whole matrix."""
    calls = []
    original = FlatBuffer.rescaled_entries
    monkeypatch.setattr(
        FlatBuffer, "rescaled_entries", lambda self, m, rows, *a: calls.append(rows) or original(self, m, rows, *a)
    )
    opt, g = _two_group_norms(size, **clip)
    assert calls == ([[0], [0]] if slow else [])
    assert opt.last_stats.norms[0].item() == pytest.approx(g.norm().item(), rel=1e-6, abs=0)
    assert opt.last_stats.norms[1].item() == pytest.approx(1000**0.5, rel=1e-6)


def test_complex_parameters_use_the_real_inner_product():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
    q = torch.nn.Parameter(torch.randn(3))
    opt = Balancer(torch.optim.SGD([p, q], lr=0.1), plugins=["task_norm"])
    losses = {"a": lambda: (p.abs() ** 2).sum() + (q**2).sum(), "b": lambda: 3 * ((p - 1j).abs() ** 2).sum()}
    rows = []
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss(), [p, q], allow_unused=True)
        grads = [torch.zeros(3) if g is None else g for g in grads]
        rows.append(torch.cat([torch.view_as_real(grads[0]).reshape(-1), grads[1]]).double())
        with opt.group(name):
            loss().backward()
    before = p.detach().clone()
    opt.step()
    a = torch.stack(rows)
    torch.testing.assert_close(opt.last_stats.gram, a @ a.T, rtol=1e-6, atol=1e-6)
    w = opt.last_stats.weights.float()
    update = torch.view_as_complex((w[0] * rows[0][:10] + w[1] * rows[1][:10]).float().reshape(5, 2))
    torch.testing.assert_close((before - p.detach()) / 0.1, update, rtol=1e-5, atol=1e-5)


def test_a_sparse_gradient_in_a_group_is_refused_and_the_balancer_stays_usable():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    opt = Balancer(torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1))
    with opt.group("dense"):
        head(torch.ones(2, 4)).sum().backward()
    with pytest.raises(CaptureError, match=r"sparse gradient .* shape \(10, 4\).*sparse=False"):
        with opt.group("sparse"):
            head(emb(torch.tensor([1, 2]))).sum().backward()
    assert opt.backend.active is None and opt.backend.names == ("dense",)
    assert all(p.grad is None for p in (*emb.parameters(), *head.parameters()))  # nothing of the block kept
    opt.step()  # the pending group is still there
    assert opt.last_stats.names == ("dense",)


def test_a_parameter_listed_twice_is_refused():
    w = torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch may warn about the duplicate itself
        inner = torch.optim.SGD([w, w], lr=0.1)
    with pytest.raises(CaptureError, match=r"listed twice.*\[0\]\[.params.\]\[1\]"):
        Balancer(inner)
    opt = Balancer(torch.optim.SGD([w], lr=0.1))
    opt.inner.param_groups[0]["params"].append(w)  # behind the optimizer's back
    with pytest.raises(CaptureError, match="listed twice"):
        with opt.group("a"):
            pass


def test_a_parameter_unfrozen_between_groups_is_refused(make_model, make_batches, group_loss):
    model = make_model()
    model[2].weight.requires_grad_(False)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    batches = make_batches()
    with opt.group("g0"):
        group_loss(model, batches["g0"]).backward()
    model[2].weight.requires_grad_(True)
    with pytest.raises(CaptureError, match=r"started to require grad.*\(3, 16\)"):
        with opt.group("g1"):
            pass
    with pytest.raises(CaptureError, match="started to require grad"):
        opt.step()
    model[2].weight.requires_grad_(False)  # freezing again (or between steps) is fine
    opt.step()
    opt.zero_grad()
    model[2].weight.requires_grad_(True)
    for name in ("g0", "g1"):
        with opt.group(name):
            group_loss(model, batches[name]).backward()
    opt.step()
    assert model[2].weight.grad is not None


def test_many_groups_in_the_first_step_read_the_rows_once(make_model):
    """k = 256 groups appearing one by one get a block each; the Gram matrix and the combination
    read them tile by tile (not one product per pair of blocks) and equal the one-block result."""
    model = make_model(dtype=torch.float64)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    params = list(model.parameters())
    x = torch.randn(256, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = []
    for i in range(256):
        loss = model(x[i : i + 1]).pow(2).sum() * (1 + i % 7)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]))
        with opt.group(f"g{i}"):
            loss.backward()
    assert len(opt.backend.buffers[0].blocks) == 256
    a = torch.stack(rows)
    torch.testing.assert_close(opt.backend.gram(), a @ a.T, rtol=1e-12, atol=1e-12 * a.norm(dim=1).max() ** 2)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close((before - after) / 0.1, a.sum(0), rtol=1e-12, atol=1e-12 * a.abs().sum())
    assert [b.shape[0] for b in opt.backend.buffers[0].blocks] == [257]


def test_a_row_reservation_that_does_not_fit_is_dropped_with_a_warning(make_model, make_batches, group_loss):
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backend.reserve_rows(2**40)  # what a corrupt checkpoint below the 4096 bound can still ask of a big model
    with pytest.warns(BalancerWarning, match="could not be honoured"):
        with opt.group("g0"):
            group_loss(model, make_batches()["g0"]).backward()
    opt.step()
    assert opt.last_stats.names == ("g0",) and opt.backend.buffers[0].capacity == 1


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_a_refined_row_with_an_ungrouped_gradient_keeps_the_clip_exact(scale):
    """The refinement rewrites the suspect row's entries against every row, the ungrouped one included."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = Balancer(torch.optim.SGD([p], lr=1.0), max_grad_norm=1e40)
    g = (torch.randn(1000, dtype=torch.float64) * scale).float()
    b, c = torch.randn(1000), torch.randn(1000)
    (p * b).sum().backward()  # ungrouped
    with opt.group("tiny"):
        (p * g).sum().backward()
    with opt.group("plain"):
        (p * c).sum().backward()
    opt.step()
    rows = torch.stack([g, c]).double()
    torch.testing.assert_close(opt.last_stats.gram, rows @ rows.T, rtol=1e-6, atol=1e-6 * scale * 1000**0.5)
    update = b.double() + rows.sum(0)
    torch.testing.assert_close(opt.last_stats.grad_norm, update.norm(), rtol=1e-6, atol=0)
