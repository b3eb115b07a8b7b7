"""replay_bias (GSA, Guo et al. CVPR 2023): per-class sums, weights and rescaling against float64 references."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from balancer import Balancer, ConfigError, PluginError
from balancer.contract.tap_event import TapEvent
from balancer.plugins import ReplayBias
from balancer.plugins.replay_bias import class_bias

INF = float("inf")


class Reference:
    """GSA's statistics with Python floats and loops, straight from the formulas."""

    def __init__(self, warmup=5, scale=2.0, centre=1.0, decay=1.0, task_start="manual"):
        self.n, self.p, self.q = {}, {}, {}
        self.warmup, self.scale, self.centre, self.decay = warmup, scale, centre, decay
        self.new_class_starts = task_start == "new_class"  # else only start_task() starts a task
        self.task_steps = 0

    def start_task(self):
        self.task_steps = 0

    def batch_sums(self, logits, labels):
        n, p, q = {}, {}, {}
        for row, y in zip(logits, labels, strict=True):
            m = max(row)
            e = [math.exp(v - m) if v != -INF else 0.0 for v in row]
            probs = [v / sum(e) for v in e]
            for c, pc in enumerate(probs):
                n[c] = n.get(c, 0.0) + (c == y)
                p[c] = p.get(c, 0.0) + (pc if c == y else 0.0)
                q[c] = q.get(c, 0.0) + (0.0 if c == y else pc)
        return n, p, q

    def weights(self, logits, labels, include_current=True):
        n, p, q = self.batch_sums(logits, labels)
        new = self.new_class_starts and any(n[c] > 0 and self.n.get(c, 0.0) == 0 for c in n)
        if self.task_steps < self.warmup or (new and self.warmup > 0):
            return [1.0] * len(labels)
        out = []
        for y in labels:
            cur = include_current
            nn = self.decay * self.n.get(y, 0.0) + (n[y] if cur else 0.0)
            pp = self.decay * self.p.get(y, 0.0) + (p[y] if cur else 0.0)
            qq = self.decay * self.q.get(y, 0.0) + (q[y] if cur else 0.0)
            if nn == 0:
                out.append(1.0)
                continue
            ant = (nn - pp) / qq if qq > 0 else (INF if nn - pp > 0 else 1.0)
            out.append(self.scale / (1.0 + math.exp(self.centre - ant)))
        return out

    def step(self, logits, labels):
        n, p, q = self.batch_sums(logits, labels)
        new = self.new_class_starts and any(n[c] > 0 and self.n.get(c, 0.0) == 0 for c in n)
        for c in n:
            self.n[c] = self.decay * self.n.get(c, 0.0) + n[c]
            self.p[c] = self.decay * self.p.get(c, 0.0) + p[c]
            self.q[c] = self.decay * self.q.get(c, 0.0) + q[c]
        self.task_steps = 1 if new else self.task_steps + 1


def _leaf_opt(plugins):
    dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    return Balancer(torch.optim.SGD([dummy], lr=0.0), plugins=plugins)


def _tap_step(opt, logits, labels, groups="replay"):
    """Taps leaf logits, backward of the summed CE, step; returns the rescaled logits gradient."""
    z = logits.clone().requires_grad_(True)
    out = opt.tap(z, group=groups, labels=labels)
    F.cross_entropy(out, labels, reduction="sum").backward()
    opt.step()
    opt.zero_grad()
    return z.grad


def _stream(seed, steps, classes=5, rows=7):
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        seen = min(classes, 2 + t // 2)  # classes arrive over the stream
        logits = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2
        logits[:, seen:] = -INF
        labels = torch.randint(0, seen, (rows,), generator=gen)
        yield logits, labels


@pytest.mark.parametrize(
    "options",
    [
        {"warmup": 0},
        {"warmup": 2},
        {"warmup": 2, "task_start": "new_class"},
        {"include_current": False, "warmup": 1},
        {"include_current": False, "warmup": 1, "task_start": "new_class"},
    ],
)
def test_sums_weights_and_gradients_match_float64_reference(options):
    opt = _leaf_opt([("replay_bias", options)])
    ref = Reference(warmup=options["warmup"], task_start=options.get("task_start", "manual"))
    for t, (logits, labels) in enumerate(_stream(0, 8)):
        if t == 5:  # a task boundary announced mid-stream
            ReplayBias.start_task(opt)
            ref.start_task()
        w = ref.weights(logits.tolist(), labels.tolist(), options.get("include_current", True))
        grad = _tap_step(opt, logits, labels)
        expected = torch.tensor(w, dtype=torch.float64)[:, None] * (logits.softmax(1) - F.one_hot(labels, 5))
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
        ref.step(logits.tolist(), labels.tolist())
        state = opt.plugin_states["replay_bias"]
        for key, sums in (("count", ref.n), ("pos", ref.p), ("neg", ref.q)):
            torch.testing.assert_close(state[key], torch.tensor([sums.get(c, 0.0) for c in range(5)]).double())
        assert state["task_steps"].item() == ref.task_steps
    ant = opt.plugin_metrics()["replay_bias"]["ant"]
    torch.testing.assert_close(ant, torch.tensor([(ref.n[c] - ref.p[c]) / ref.q[c] for c in range(5)]).double())


def test_rescaling_at_the_tap_equals_the_explicit_weighted_loss():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.0), plugins=[("replay_bias", {"warmup": 0})])
    ref = Reference(warmup=0)
    groups = ["replay", "current"] * 5
    for _ in range(3):
        x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
        logits = model(x)
        weights = torch.tensor(ref.weights(logits.tolist(), y.tolist()), dtype=torch.float64)
        explicit = (weights * F.cross_entropy(logits, y, reduction="none")).mean()
        expected = torch.autograd.grad(explicit, list(model.parameters()))
        F.cross_entropy(opt.tap(model(x), group=groups, labels=y), y).backward()
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-10)
        ref.step(logits.tolist(), y.tolist())
        opt.step()
        opt.zero_grad()


def test_only_the_chosen_groups_are_reweighted_and_counted():
    opt = _leaf_opt([("replay_bias", {"warmup": 0, "groups": ["replay"], "count_groups": ["replay"]})])
    logits, labels = next(_stream(3, 1, classes=3, rows=6))
    groups = ["replay", "current", "replay", "current", "replay", "current"]
    _tap_step(opt, logits, labels, groups)  # first step: fills the sums from the replay rows only
    ref = Reference(warmup=0)
    ref.step(logits[0::2].tolist(), labels[0::2].tolist())
    torch.testing.assert_close(
        opt.plugin_states["replay_bias"]["count"][:2], torch.tensor([ref.n[0], ref.n[1]]).double()
    )
    logits2, labels2 = logits.flip(0), labels.flip(0)
    w = ref.weights(logits2[0::2].tolist(), labels2[0::2].tolist())  # the replay rows of the flipped batch
    grad = _tap_step(opt, logits2, labels2, groups)
    plain = logits2.softmax(1) - F.one_hot(labels2, 3)
    torch.testing.assert_close(grad[1::2], plain[1::2])  # "current" rows untouched
    torch.testing.assert_close(grad[0::2], torch.tensor(w).double()[:, None] * plain[0::2])


def test_new_classes_mid_stream_grow_the_state_and_restart_the_warmup():
    opt = _leaf_opt([("replay_bias", {"warmup": 2, "task_start": "new_class"})])
    gen = torch.Generator().manual_seed(5)
    for t in range(7):
        classes = 2 if t < 4 else 4  # a growing head: the tapped logits widen at step 4
        logits = torch.randn(6, classes, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, classes, (6,), generator=gen) if t != 4 else torch.tensor([0, 1, 2, 3, 2, 3])
        grad = _tap_step(opt, logits, labels)
        plain = logits.softmax(1) - F.one_hot(labels, classes)
        state = opt.plugin_states["replay_bias"]
        assert state["count"].shape == (classes,)
        assert state["task_steps"].item() == (t + 1 if t < 4 else t - 3)
        assert torch.allclose(grad, plain, rtol=1e-12, atol=1e-14) == (t in (0, 1, 4, 5)), (
            t
        )  # warm-up: first 2 steps of each task
    assert opt.plugin_states["replay_bias"]["seen"].tolist() == [1.0] * 4


def test_warm_steps_per_task_follow_the_paper_by_default_and_each_new_class_with_new_class():
    """GSA: weight 1 for the first 5 batches of each task. A task whose second class first shows
    up in its third batch: 5 warm steps by default (boundaries announced), 7 with ``new_class``."""

    def warm_steps(options, announce):
        opt = _leaf_opt([("replay_bias", options)])
        gen = torch.Generator().manual_seed(7)
        warm = [0, 0, 0]
        for task in range(3):
            if announce:
                ReplayBias.start_task(opt)
            for batch in range(10):
                head = 2 * (task + 1)  # the growing head: the classes of the tasks so far
                logits = torch.randn(6, head, generator=gen, dtype=torch.float64)
                labels = torch.full((6,), 2 * task) if batch < 2 else 2 * task + torch.arange(6) % 2
                grad = _tap_step(opt, logits, labels)
                warm[task] += torch.allclose(grad, logits.softmax(1) - F.one_hot(labels, head), rtol=0, atol=1e-15)
        return warm

    assert warm_steps({"warmup": 5}, announce=True) == [5, 5, 5]
    assert warm_steps({"warmup": 5}, announce=False) == [5, 0, 0]  # no announced boundary: only the start
    assert warm_steps({"warmup": 5, "task_start": "new_class"}, announce=False) == [7, 7, 7]
    assert warm_steps({"warmup": 5, "task_start": "new_class"}, announce=True) == [7, 7, 7]


def test_manual_task_start():
    opt = _leaf_opt([("replay_bias", {"warmup": 1})])  # the default, task_start="manual"
    stream = list(_stream(2, 6, classes=4))
    grads = []
    for t, (logits, labels) in enumerate(stream):
        if t == 3:
            ReplayBias.start_task(opt)
        grads.append(_tap_step(opt, logits, labels))
        assert opt.plugin_states["replay_bias"]["task_steps"].item() == (t + 1 if t < 3 else t - 2)
    plain = [lg.softmax(1) - F.one_hot(lb, 4) for lg, lb in stream]
    assert [torch.allclose(g, p, rtol=1e-12, atol=1e-14) for g, p in zip(grads, plain, strict=True)] == [
        True,
        False,
        False,
        True,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="no replay_bias plugin"):
        ReplayBias.start_task(_leaf_opt(["task_norm"]))


def test_state_round_trip_gives_identical_next_steps(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 4).double()
        return model, Balancer(torch.optim.Adam(model.parameters(), lr=1e-2), plugins=[("replay_bias", {"warmup": 1})])

    def run(model, opt, batches):
        for x, y in batches:
            F.cross_entropy(opt.tap(model(x), group="replay", labels=y), y).backward()
            opt.step()
            opt.zero_grad()

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen))]
    batches = batches * 1 + [(torch.randn(8, 5, generator=gen).double(), torch.randint(0, 4, (8,))) for _ in range(5)]
    model_a, opt_a = make()
    run(model_a, opt_a, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b, opt_b = make()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    run(model_a, opt_a, batches[3:])
    run(model_b, opt_b, batches[3:])
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    for key, value in opt_a.plugin_states["replay_bias"].items():
        assert torch.equal(value, opt_b.plugin_states["replay_bias"][key]), key


def test_a_class_with_no_negatives_gets_finite_weights():
    opt = _leaf_opt([("replay_bias", {"warmup": 0})])
    only = torch.tensor([[0.3, -INF, -INF], [1.0, -INF, -INF]], dtype=torch.float64)  # one seen class: p = 1
    grad = _tap_step(opt, only, torch.tensor([0, 0]))
    assert torch.isfinite(grad).all()
    metrics = opt.plugin_metrics()["replay_bias"]
    # p = 1 exactly: the rows receive a zero gradient, so they are not counted (weight 1, ANT undefined)
    assert metrics["count"][0].item() == 0 and metrics["weight"][0].item() == 1.0
    ant, weight = class_bias(*torch.tensor([[2.0, 2.0], [2.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert ant.tolist() == [1.0, INF] and weight.tolist() == [1.0, 2.0]  # no pull nor push: neutral
    two = torch.tensor([[0.3, 0.1, -INF], [1.0, -0.5, -INF]], dtype=torch.float64)  # class 0 is never a negative
    grad = _tap_step(opt, two, torch.tensor([0, 0]))
    metrics = opt.plugin_metrics()["replay_bias"]
    assert metrics["ant"][0].item() == INF and metrics["weight"][0].item() == 2.0
    torch.testing.assert_close(grad, 2.0 * (two.softmax(1) - F.one_hot(torch.tensor([0, 0]), 3)))
    assert torch.isfinite(metrics["weight"]).all() and torch.isnan(metrics["ant"][2])


def test_ignored_labels_and_rows_without_gradient_are_not_counted():
    opt = _leaf_opt([("replay_bias", {"warmup": 0})])
    logits = torch.randn(4, 3, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, -100, 1, 2])
    out = opt.tap(logits, group="replay", labels=labels)
    (F.cross_entropy(out[:3], labels[:3], reduction="sum", ignore_index=-100)).backward()  # row 3 is in no loss
    opt.step()
    ref = Reference()
    ref.step(logits[[0, 2]].tolist(), [0, 1])
    state = opt.plugin_states["replay_bias"]
    torch.testing.assert_close(state["count"], torch.tensor([1.0, 1.0, 0.0]).double())
    torch.testing.assert_close(state["neg"], torch.tensor([ref.q[c] for c in range(3)]).double())


def test_gradient_accumulation_gives_the_state_of_the_concatenated_batch():
    logits, labels = next(_stream(7, 1, classes=4, rows=10))
    split = _leaf_opt(["replay_bias"])
    for part in (slice(0, 4), slice(4, 10)):
        z = logits[part].clone().requires_grad_(True)
        F.cross_entropy(split.tap(z, group="replay", labels=labels[part]), labels[part]).backward()
    split.step()
    whole = _leaf_opt(["replay_bias"])
    _tap_step(whole, logits, labels)
    a, b = split.plugin_states["replay_bias"], whole.plugin_states["replay_bias"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-14, atol=0)


def test_decay_gives_exponentially_weighted_sums():
    opt = _leaf_opt([("replay_bias", {"warmup": 0, "decay": 0.5})])
    ref = Reference(warmup=0, decay=0.5)
    for logits, labels in _stream(4, 5, classes=3):
        w = ref.weights(logits.tolist(), labels.tolist())
        grad = _tap_step(opt, logits, labels)
        torch.testing.assert_close(grad, torch.tensor(w).double()[:, None] * (logits.softmax(1) - F.one_hot(labels, 3)))
        ref.step(logits.tolist(), labels.tolist())
    torch.testing.assert_close(
        opt.plugin_states["replay_bias"]["pos"], torch.tensor([ref.p[c] for c in range(3)]).double()
    )


def test_tap_without_labels_is_refused_with_the_plugin_name():
    opt = _leaf_opt(["replay_bias"])
    z = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(PluginError, match="replay_bias.*integer class labels"):
        opt.tap(z, group="replay").logsumexp(1).sum().backward()


def test_initial_state_holds_the_documented_keys():
    """Conformance of the pass-through update and the tap: tests/plugins/test_common.py."""
    state = ReplayBias().init()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == {"count", "pos", "neg", "seen", "task_steps"}


def test_tap_and_merge_do_not_synchronise_with_the_device():
    from balancer.contract.testing import _no_host_sync

    plugin = ReplayBias(warmup=1)
    state, stats = plugin.init(), plugin.init_tap_stats()
    for logits, labels in _stream(8, 4, classes=4):
        groups = ("replay",) * labels.shape[0]
        event = TapEvent(grad=logits.softmax(1), value=logits, names=groups[:1], group_index=labels * 0, labels=labels)
        with _no_host_sync("replay_bias"):
            _, stats = plugin.tap(event, state, stats)
            state = plugin.merge_tap_stats(state, stats)
            plugin.metrics(state)
        stats = plugin.init_tap_stats()
    assert state["count"].sum().item() == 4 * 7


def test_a_row_without_finite_softmax_does_not_poison_the_sums():
    opt = _leaf_opt([("replay_bias", {"warmup": 0})])
    logits = torch.tensor([[0.5, -1.0], [-INF, -INF], [2.0, 0.0]], dtype=torch.float64)
    z = logits.clone().requires_grad_(True)
    out = opt.tap(z, group="replay", labels=torch.tensor([0, 1, 1]))
    (F.cross_entropy(out[[0, 2]], torch.tensor([0, 1])) + out[1].sum()).backward()  # row 1 gets gradient 1
    opt.step()
    state = opt.plugin_states["replay_bias"]
    assert all(torch.isfinite(state[k]).all() for k in ("count", "pos", "neg"))
    assert state["count"].tolist() == [1.0, 1.0]
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"count_groups": []}, r"count_groups=\(\) counts no row.*Use None"),
        (
            {"warmup": 0, "task_start": "new_class"},
            r"task_start='new_class' would be ignored with warmup=0.*warmup > 0",
        ),
        ({"groups": [], "include_current": False}, r"include_current=False would be ignored with groups=\(\)"),
    ],
)
def test_ignored_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=rf"plugins\.0\.options.*{message}"):
        _leaf_opt([("replay_bias", options)])
    ReplayBias(groups=())  # measuring ANT without reweighting (the w ≡ 1 ablation) is a use, documented
