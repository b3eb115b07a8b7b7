"""``opt.backward_rows(loss, at=..., group=...)``: groups that are rows of one forward pass.

References are built independently: one forward per group on that group's rows (the model treats
rows independently), parameters used above ``at`` detached inside the groups, and the part that
avoids ``at`` backpropagated outside any group. Everything is float64; errors are compared
relative to the largest value compared, with an absolute floor scaled by it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from balancer import Balancer, CaptureError

V, D, T = 13, 8, 5
ROWS = ["a", "b", "a", "c", "b", "a"]
SCALES = {"a": 0.2, "b": 1.0, "c": 20.0}  # targets of very different size: imbalanced groups

MAX_ERR: dict[str, float] = {}  # largest relative error per comparison, printed with -s


class Spy(torch.autograd.Function):
    """Identity that counts its backward calls (how often the trunk's backward runs)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        Spy.calls += 1
        return grad


class Net(torch.nn.Module):
    """Embedding, a linear layer and LayerNorm per token, then a head to one score per token."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.lin = torch.nn.Linear(D, D)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, 1)
        self.tied = tied

    def hidden(self, tokens):
        h0 = self.emb(tokens)
        return h0, self.norm(Spy.apply(torch.tanh(self.lin(h0))) + h0)

    def head_out(self, h, detach_head: bool = False):
        if self.tied:  # the embedding serves as the head too: one leaf below and above `at`
            w = self.emb.weight.detach() if detach_head else self.emb.weight
            return (h @ w.T).logsumexp(-1)
        w, b = (
            (self.head.weight, self.head.bias)
            if not detach_head
            else (self.head.weight.detach(), self.head.bias.detach())
        )
        return F.linear(h, w, b).squeeze(-1)  # [B, T]


def make_model(tied: bool = False, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(tied).double()


def make_batch(rows=ROWS, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (len(rows), T), generator=gen)
    y = torch.stack([torch.randn(T, generator=gen, dtype=torch.float64) * SCALES.get(g, 1.0) for g in rows])
    return tokens, y


def row_loss(out, y):
    """Per-row loss: [B, T] scores against targets, summed over tokens."""
    return (out - y).pow(2).sum(-1)


def extra(model, h0):
    """Terms that avoid `at`: a regulariser on a parameter below it, an auxiliary term upstream of it."""
    return 1e-2 * model.emb.weight.pow(2).sum() + 0.3 * h0.pow(2).mean()


def assert_close(name, actual, expected, rtol=1e-10):
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) / max(scale, 1e-300) if expected.numel() else 0.0
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


# -- the step under test and its references ------------------------------------------------------
def rows_step(model, opt, batches, *, at_hidden=False, with_extra=False, norm=None):
    """One `backward_rows` call per (rows, tokens, y) chunk; `norm` divides the summed row losses."""
    norm = norm or sum(len(rows) for rows, _, _ in batches)
    for rows, tokens, y in batches:
        h0, h = model.hidden(tokens)
        out = model.head_out(h)
        loss = row_loss(out, y).sum() / norm
        if with_extra:
            loss = loss + extra(model, h0) / len(batches)
        opt.backward_rows(loss, at=h if at_hidden else out, group=rows)


def reference_step(model, opt, batches, *, at_hidden=False, with_extra=False, norm=None):
    """The same gradients with one forward per group and per chunk, through `opt.group`."""
    norm = norm or sum(len(rows) for rows, _, _ in batches)
    for rows, tokens, y in batches:
        for name in dict.fromkeys(rows):
            pick = torch.tensor([r == name for r in rows])
            _, h = model.hidden(tokens[pick])
            with opt.group(name):
                (row_loss(model.head_out(h, detach_head=at_hidden), y[pick]).sum() / norm).backward()
        h0, h = model.hidden(tokens)
        ungrouped = torch.zeros((), dtype=torch.float64)
        if at_hidden:  # the head's own gradient does not flow through `at`
            ungrouped = ungrouped + row_loss(model.head_out(h.detach()), y).sum() / norm
        if with_extra:
            ungrouped = ungrouped + extra(model, h0) / len(batches)
        if ungrouped.requires_grad:
            ungrouped.backward()


def run_pair(plugins, steps=3, tied=False, lr=0.05, **kwargs):
    """Runs `rows_step` and `reference_step` side by side; compares stats every step and parameters."""
    model = make_model(tied)
    ref = copy.deepcopy(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), plugins=plugins)
    ref_opt = Balancer(torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9), plugins=plugins)
    chunks = kwargs.pop("chunks", None)
    for step in range(steps):
        batches = chunks(step) if chunks else [(ROWS, *make_batch(seed=step))]
        rows_step(model, opt, batches, **kwargs)
        reference_step(ref, ref_opt, batches, **kwargs)
        opt.step()
        ref_opt.step()
        assert opt.last_stats.names == ref_opt.last_stats.names
        assert_close("gram", opt.last_stats.gram, ref_opt.last_stats.gram)
        assert_close("weights", opt.last_stats.weights, ref_opt.last_stats.weights)
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close("params", p.detach(), q.detach())
    return opt


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plugins", [[], ["task_norm"]])
def test_groups_equal_separate_per_group_losses(plugins):
    opt = run_pair(plugins)
    assert opt.last_stats.names == ("a", "b", "c")
    weights = opt.last_stats.weights
    if plugins:  # imbalanced groups: task_norm's weights are far from 1, the comparison is not trivial
        assert float(weights.max() / weights.min()) > 1.5


@pytest.mark.parametrize("plugins", [[], ["task_norm"]])
def test_terms_that_avoid_at_go_ungrouped(plugins):
    run_pair(plugins, with_extra=True)


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_above_at_are_ungrouped(tied):
    run_pair(["task_norm"], at_hidden=True, with_extra=True, tied=tied)


def test_no_plugin_update_is_that_of_the_summed_loss():
    model = make_model()
    bare = copy.deepcopy(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05))
    inner = torch.optim.SGD(bare.parameters(), lr=0.05)
    tokens, y = make_batch()
    rows_step(model, opt, [(ROWS, tokens, y)], with_extra=True)
    h0, h = bare.hidden(tokens)
    (row_loss(bare.head_out(h), y).sum() / len(ROWS) + extra(bare, h0)).backward()
    opt.step()
    inner.step()
    for p, q in zip(model.parameters(), bare.parameters(), strict=True):
        assert_close("plain", p.detach(), q.detach())


def _chunks(step):
    tokens, y = make_batch(seed=step)
    # the first chunk holds no row of group "c": a group absent from a call
    return [(ROWS[:3], tokens[:3], y[:3]), (ROWS[3:], tokens[3:], y[3:])]


@pytest.mark.parametrize("plugins", [[], ["task_norm"]])
def test_chunked_calls_accumulate_and_absent_groups_are_untouched(plugins):
    opt = run_pair(plugins, chunks=_chunks, with_extra=True)
    assert opt.last_stats.names == ("a", "b", "c")


def test_pairwise_loss_splits_by_the_chain_rule_at_at():
    """DPO-like: the loss couples the two halves; each group gets its half's path, the other detached."""
    model = make_model()
    ref = copy.deepcopy(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    ref_opt = Balancer(torch.optim.SGD(ref.parameters(), lr=0.1), plugins=["task_norm"])
    tokens, _ = make_batch(rows=["w"] * 3 + ["l"] * 3)
    score = model.head_out(model.hidden(tokens)[1]).sum(-1)
    opt.backward_rows(-F.logsigmoid(score[:3] - score[3:]).mean(), at=score, group=["w"] * 3 + ["l"] * 3)
    win = ref.head_out(ref.hidden(tokens[:3])[1]).sum(-1)
    lose = ref.head_out(ref.hidden(tokens[3:])[1]).sum(-1)
    with ref_opt.group("w"):
        (-F.logsigmoid(win - lose.detach()).mean()).backward()
    with ref_opt.group("l"):
        (-F.logsigmoid(win.detach() - lose).mean()).backward()
    opt.step()
    ref_opt.step()
    assert_close("gram", opt.last_stats.gram, ref_opt.last_stats.gram)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close("params", p.detach(), q.detach())


def test_one_string_puts_every_row_in_one_group():
    model = make_model()
    ref = copy.deepcopy(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = Balancer(torch.optim.SGD(ref.parameters(), lr=0.1))
    tokens, y = make_batch()
    out = model.head_out(model.hidden(tokens)[1])
    opt.backward_rows(row_loss(out, y).mean(), at=out, group="all")
    ref_opt.backward({"all": row_loss(ref.head_out(ref.hidden(tokens)[1]), y).mean()})
    opt.step()
    ref_opt.step()
    assert opt.last_stats.names == ("all",)
    assert_close("gram", opt.last_stats.gram, ref_opt.last_stats.gram)


def test_mixes_with_group_blocks_in_one_step():
    model = make_model()
    ref = copy.deepcopy(model)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["task_norm"])
    ref_opt = Balancer(torch.optim.SGD(ref.parameters(), lr=0.1), plugins=["task_norm"])
    tokens, y = make_batch()
    for m, o in ((model, opt), (ref, ref_opt)):
        with o.group("b"):
            row_loss(m.head_out(m.hidden(tokens[:2])[1]), y[:2]).mean().backward()
    rows_step(model, opt, [(ROWS, tokens, y)])
    reference_step(ref, ref_opt, [(ROWS, tokens, y)])
    opt.step()
    ref_opt.step()
    assert opt.last_stats.names == ref_opt.last_stats.names == ("b", "a", "c")
    assert_close("gram", opt.last_stats.gram, ref_opt.last_stats.gram)


# -- cost and graph semantics ------------------------------------------------------------------------
def test_the_part_below_at_runs_once_per_group_when_nothing_avoids_at():
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    tokens, y = make_batch()
    Spy.calls = 0
    rows_step(model, opt, [(ROWS, tokens, y)], at_hidden=True)  # the head avoids `at`, it is above it
    assert Spy.calls == 3  # three groups, no pass of zeros below `at`
    Spy.calls = 0
    rows_step(model, opt, [(ROWS, tokens, y)], with_extra=True)  # a regulariser on the embedding below `at`
    assert Spy.calls == 4  # one more pass carrying zeros to reach it


def test_retain_graph():
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1))
    tokens, y = make_batch()
    out = model.head_out(model.hidden(tokens)[1])
    loss = row_loss(out, y).mean()
    opt.backward_rows(loss, at=out, group=ROWS, retain_graph=True)
    opt.backward_rows(loss, at=out, group=ROWS)  # the graph was kept: a second call works
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        opt.backward_rows(loss, at=out, group=ROWS)  # the last call freed it


def test_grad_scaler_gives_the_unscaled_result():
    def make():
        torch.manual_seed(0)
        return Net()

    model, scaled = make(), make()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05), plugins=["task_norm"])
    amp_opt = Balancer(torch.optim.SGD(scaled.parameters(), lr=0.05), plugins=["task_norm"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for step in range(3):
        tokens, y = make_batch(seed=step)
        y = y.float()
        for m, o, s in ((model, opt, None), (scaled, amp_opt, scaler)):
            h0, h = m.hidden(tokens)
            out = m.head_out(h)
            loss = row_loss(out, y).mean() + extra(m, h0)
            o.backward_rows(loss if s is None else s.scale(loss), at=out, group=ROWS)
        opt.step()
        scaler.step(amp_opt)
        scaler.update()
        assert scaler.get_scale() == 2.0**12  # no overflow: every step was applied
        torch.testing.assert_close(amp_opt.last_stats.norms, opt.last_stats.norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(amp_opt.last_stats.weights, opt.last_stats.weights, rtol=1e-6, atol=0)
        opt.zero_grad()
        amp_opt.zero_grad()
    for p, q in zip(model.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- refusals: each names the problem, and nothing has run ------------------------------------------
def _setup():
    model = make_model()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), model=None)
    tokens, y = make_batch()
    h0, h = model.hidden(tokens)
    out = model.head_out(h)
    return model, opt, out, row_loss(out, y).mean()


def _untouched(model, opt):
    assert all(p.grad is None for p in model.parameters())
    assert opt.backend.names == ()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("too_few_names", r"one group name per row of `at`: it has 6 rows .* found 5 names"),
        ("empty_name", r"group name must be a non-empty string. Found `''`"),
        ("detached", r"`at` \(shape \(6, 5\)\) does not require grad"),
        ("leaf", r"`at` \(shape \(13, 8\)\) is a leaf tensor"),
        ("scalar_at", r"one row per sample along dimension 0 .* Found a 0-d tensor"),
        ("other_graph", r"the loss does not depend on `at` \(shape \(6, 5\)\)"),
        ("loss_not_scalar", r"`loss` must be a scalar tensor that requires grad. Found shape \(6,\)"),
    ],
)
def test_bad_inputs_are_refused_before_anything_runs(case, match):
    model, opt, out, loss = _setup()
    at, group = out, ROWS
    if case == "too_few_names":
        group = ROWS[:5]
    elif case == "empty_name":
        group = [*ROWS[:5], ""]
    elif case == "detached":
        at = out.detach()
    elif case == "leaf":
        at = model.emb.weight
    elif case == "scalar_at":
        at = out.sum()
    elif case == "other_graph":
        at = model.head_out(model.hidden(make_batch()[0])[1])
    elif case == "loss_not_scalar":
        loss = row_loss(out, make_batch()[1])
    with pytest.raises(CaptureError, match=match):
        opt.backward_rows(loss, at=at, group=group)
    _untouched(model, opt)
    opt.backward_rows(row_loss(out, make_batch()[1]).mean(), at=out, group=ROWS)  # still usable
    assert opt.backend.names == ("a", "b", "c")


def test_refused_inside_a_group_block():
    model, opt, out, loss = _setup()
    with opt.group("a"), pytest.raises(CaptureError, match=r"called inside group `a`.*outside any `opt.group"):
        opt.backward_rows(loss, at=out, group=ROWS)
    assert all(p.grad is None for p in model.parameters())


def test_refused_after_clip_grad_norm():
    model, opt, out, loss = _setup()
    with opt.group("z"):
        model.head_out(model.hidden(make_batch()[0])[1]).sum().backward()
    opt.clip_grad_norm_(1.0)
    with pytest.raises(CaptureError, match=r"after opt.clip_grad_norm_\(\)"):
        opt.backward_rows(loss, at=out, group=ROWS)
    assert all(p.grad is None for p in model.parameters())  # the ungrouped gradient: still none
    assert opt.backend.names == ("z",)


def _linear_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x = torch.randn(4, 4, dtype=torch.float64)
    return model, opt, x


def test_refused_after_layer_capture_in_the_same_step():
    model, opt, x = _linear_setup()
    opt.backward_samples(model(x).squeeze(-1).pow(2), group=["a", "a", "b", "b"])
    out = model(x).squeeze(-1)
    with pytest.raises(CaptureError, match=r"cannot be mixed with `backward_samples`/`backward_tasks`.*\['a', 'b'\]"):
        opt.backward_rows(out.pow(2).sum(), at=out, group=["a", "a", "b", "b"])
    assert all(p.grad is None for p in model.parameters())


def test_layer_capture_refused_after_backward_rows():
    model, opt, x = _linear_setup()
    out = model(x).squeeze(-1)
    opt.backward_rows(out.pow(2).sum(), at=out, group=["a", "a", "b", "b"])
    with pytest.raises(CaptureError, match=r"backward_samples cannot be mixed with .*`opt.backward_rows`"):
        opt.backward_samples(model(x).squeeze(-1).pow(2), group=["a", "a", "b", "b"])


def test_refused_on_a_sharded_backend():
    from balancer.capture.flat_buffer import TensorKind
    from balancer.capture.local import LocalBackend

    class ShardKind(TensorKind):  # as FSDP2's gradients: a local shard in a distributed tensor
        pass

    class Sharded(LocalBackend):
        kind = ShardKind

    model, _, out, loss = _setup()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Balancer(inner, backend=Sharded(inner))
    with pytest.raises(CaptureError, match=r"works on one process and under DDP. Found the backend `Sharded`"):
        opt.backward_rows(loss, at=out, group=ROWS)
    assert all(p.grad is None for p in model.parameters())


def test_max_errors_are_reported():
    """Runs last in this file: prints the largest relative errors seen (``pytest -s``)."""
    if not MAX_ERR:
        pytest.skip("run with the exactness tests above")
    print("\nbackward_rows max relative errors:", {k: f"{v:.1e}" for k, v in sorted(MAX_ERR.items())})
    assert max(MAX_ERR.values()) < 1e-10
