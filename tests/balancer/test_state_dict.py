"""Checkpoints: plugin state in the state dict, weights_only loading, exact resume in a fresh process."""

from __future__ import annotations

import copy
import functools
import io
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from balancer import Balancer, Plugin, PluginError, StateDictError

TRAIN = textwrap.dedent(
    """
    import sys, torch
    from balancer import Balancer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def batches(step):
        gen = torch.Generator().manual_seed(step)
        pair = lambda i: (torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * 10.0**i)
        return {f"g{i}": pair(i) for i in range(3)}

    def train(m, opt, steps):
        for step in steps:
            for name, (x, y) in batches(step).items():
                with opt.group(name):
                    torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    def build(m):
        inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return Balancer(inner, plugins=[("task_norm", {"beta": 0.8, "target": "ema"})])

    mode, path = sys.argv[1], sys.argv[2]
    m = model()
    opt = build(m)
    if mode == "save":
        train(m, opt, range(3))
        torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, path)
    elif mode == "resume":
        ckpt = torch.load(path, weights_only=True)
        m.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        train(m, opt, range(3, 6))
        torch.save([p.detach() for p in m.parameters()], path + ".final")
    else:
        train(m, opt, range(6))
        torch.save([p.detach() for p in m.parameters()], path + ".final")
    """
)


def _run(script, *args):
    subprocess.run([sys.executable, str(script), *args], check=True, timeout=120)


def test_resume_in_fresh_process_is_exact(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    _run(script, "save", str(tmp_path / "ckpt.pt"))
    _run(script, "resume", str(tmp_path / "ckpt.pt"))
    _run(script, "straight", str(tmp_path / "ref.pt"))
    resumed = torch.load(tmp_path / "ckpt.pt.final", weights_only=True)
    straight = torch.load(tmp_path / "ref.pt.final", weights_only=True)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


def _trained(make_model, make_batches, group_loss, plugins):
    model = make_model()
    opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-2), plugins=plugins)
    for step in range(2):
        for name, batch in make_batches(seed=step).items():
            with opt.group(name):
                group_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_state_dict_layout_and_weights_only_round_trip(tmp_path, make_model, make_batches, group_loss):
    _, opt = _trained(make_model, make_batches, group_loss, [("task_norm", {"beta": 0.5})])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "balancer"}
    section = sd["balancer"]
    assert section["plugins"] == [{"name": "task_norm", "version": "1"}]
    assert section["step"] == 2
    assert set(section["states"]["task_norm"]["ema_norms"]) == {"g0", "g1", "g2"}
    torch.save(sd, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    _, fresh = _trained(make_model, make_batches, group_loss, [("task_norm", {"beta": 0.5})])
    fresh.load_state_dict(loaded)
    for name, value in section["states"]["task_norm"]["ema_norms"].items():
        assert torch.equal(fresh.plugin_states["task_norm"]["ema_norms"][name], value)


class _Other(Plugin):
    name = "other"

    def update(self, stats, weights, state):
        return weights, state


def test_different_plugin_list_names_missing_and_extra(make_model, make_batches, group_loss):
    _, saved = _trained(make_model, make_batches, group_loss, ["task_norm"])
    model = make_model()
    other = Balancer(torch.optim.Adam(model.parameters(), lr=1e-2), plugins=[_Other()])
    with pytest.raises(
        StateDictError, match=r"Missing from the checkpoint.*\['other'\].*extra in the checkpoint.*\['task_norm'\]"
    ):
        other.load_state_dict(saved.state_dict())


def test_bare_optimizer_state_dict_is_refused_when_plugins_need_state(make_model):
    model = make_model()
    bare = torch.optim.Adam(model.parameters())
    opt = Balancer(torch.optim.Adam(model.parameters()), plugins=["task_norm"])
    with pytest.raises(StateDictError, match="no 'balancer' section"):
        opt.load_state_dict(bare.state_dict())
    Balancer(torch.optim.Adam(model.parameters())).load_state_dict(bare.state_dict())  # no plugins: fine


def test_version_mismatch_is_refused(make_model, make_batches, group_loss):
    _, opt = _trained(make_model, make_batches, group_loss, ["task_norm"])
    sd = opt.state_dict()
    sd["balancer"]["plugins"][0]["version"] = "0"
    with pytest.raises(StateDictError, match="saved 0, installed 1"):
        opt.load_state_dict(sd)


def test_the_first_steps_after_a_resume_sum_in_the_same_order_as_the_long_run():
    """A long run keeps its rows in one merged block; a resumed Balancer reserves it at once, so
    its first Gram matrices are bit-identical, not equal only to rounding."""
    import copy

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(40, 120), torch.nn.Tanh(), torch.nn.Linear(120, 3)).double()

    def train(m, opt, steps):
        grams = []
        for step in steps:
            for i in range(3):
                gen = torch.Generator().manual_seed(100 * step + i)
                x = torch.randn(8, 40, generator=gen, dtype=torch.float64)
                y = torch.randn(8, 3, generator=gen, dtype=torch.float64) * 10.0**i
                with opt.group(f"g{i}"):
                    torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            grams.append(opt.last_stats.gram)
        return grams

    def build(m):
        return Balancer(torch.optim.SGD(m.parameters(), lr=1e-3), plugins=[("task_norm", {"beta": 0.8})])

    long_model = model()
    long_run = build(long_model)
    train(long_model, long_run, range(2))
    saved, saved_model = copy.deepcopy(long_run.state_dict()), copy.deepcopy(long_model.state_dict())
    assert saved["balancer"]["rows"] == 3
    expected = train(long_model, long_run, range(2, 4))
    resumed_model = model()
    resumed_model.load_state_dict(saved_model)
    resumed = build(resumed_model)
    resumed.load_state_dict(saved)
    for got, want in zip(train(resumed_model, resumed, range(2, 4)), expected, strict=True):
        assert torch.equal(got, want)


# -- the section is validated on save and on load ------------------------------------------------
STATEFUL = [("task_norm", {"beta": 0.5, "target": "ema"}), "famo", "dwa", "gradvac", ("nash_mtl", {"max_norm": 0.0})]


def _balancer(plugins=STATEFUL, steps=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1e-2), plugins=plugins)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batches = {
            f"g{i}": (torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * 2.0**i) for i in range(3)
        }
        opt.backward({n: torch.nn.functional.mse_loss(model(x), y) for n, (x, y) in batches.items()})
        opt.step()
        opt.zero_grad()
    return opt


def _same(a, b):
    """Equal values of equal types, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) and a.dtype == b.dtype and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and (a == b or (a != a and b != b))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("step", r"balancer\.step is missing"),
        ("plugins", r"balancer\.plugins is missing"),
        ("states", r"balancer\.states is missing"),
        ("format", r"balancer\.format is `'missing'`"),
    ],
)
def test_a_missing_key_names_the_field_not_a_key_error(key, message):
    opt = _balancer(["task_norm"], steps=1)
    sd = opt.state_dict()
    del sd["balancer"][key]
    with pytest.raises(StateDictError, match=message):
        opt.load_state_dict(sd)
    section = opt.balancer_state_dict()
    del section["plugins"][0]["version"]
    with pytest.raises(StateDictError, match=r"balancer\.plugins\[0\] is .*'name'.*a str 'name' and a str 'version'"):
        opt.load_balancer_state_dict(section)


def test_a_nan_ema_norm_is_refused_instead_of_zeroing_its_group_forever():
    """task_norm (beta > 0) and balanced_dpo's norm rule: an EMA norm of NaN gave its group weight 0 at
    every later step. famo's NaN logits gave NaN weights (every step refused), gradvac's NaN target
    stopped the pair's edits for good."""
    opt = _balancer()
    before = opt.balancer_state_dict()
    for plugin, path, value in [
        ("task_norm", ("ema_norms", "g1"), float("nan")),
        ("famo", ("logits",), float("inf")),
        ("gradvac", ("targets",), float("nan")),
        ("nash_mtl", ("alpha", "g0"), -1.0),
    ]:
        section = copy.deepcopy(before)
        leaf = section["states"][plugin]
        for key in path[:-1]:
            leaf = leaf[key]
        leaf[path[-1]] = leaf[path[-1]].clone().fill_(value)
        field = re.escape(f"balancer.states.{plugin}.{'.'.join(path)}")
        with pytest.raises(StateDictError, match=f"{field}.*found {value}.*load an earlier one"):
            opt.load_balancer_state_dict(section)
    assert _same(opt.balancer_state_dict(), before)  # nothing was restored


def test_unknown_markers_are_legitimate_nan_and_load():
    """task_norm's target before its first EMA, dwa's history before two losses, famo's log loss of a
    group whose loss was never above min_loss: NaN by design."""
    opt = _balancer([("task_norm", {}), "dwa", ("famo", {"min_loss": {"g2": 1e9}})], steps=1)
    section = opt.balancer_state_dict()
    states = section["states"]
    assert states["task_norm"]["ema_target"].isnan() and states["dwa"]["before"].isnan().all()
    assert states["famo"]["log_loss"][2].isnan()
    fresh = _balancer([("task_norm", {}), "dwa", ("famo", {"min_loss": {"g2": 1e9}})], steps=0)
    fresh.load_balancer_state_dict(copy.deepcopy(section))
    assert _same(fresh.balancer_state_dict(), section)


@pytest.mark.parametrize("rows", [2**31, -1, 3.0, "3", True])
def test_rows_out_of_bounds_is_refused_before_anything_is_reserved(rows):
    """2**31 rows of this model's 163 float32 parameters would be a 1.4 TB reservation at the next capture."""
    opt = _balancer(["task_norm"], steps=1)
    sd = opt.state_dict()
    sd["balancer"]["rows"] = rows
    with pytest.raises(StateDictError, match=rf"balancer\.rows is `{re.escape(repr(rows))}`.*from 0 to 4096.*delete"):
        opt.load_state_dict(sd)
    del sd["balancer"]["rows"]  # the documented fix: rows is an optional hint
    opt.load_state_dict(sd)


class _Opaque:
    pass


class _KeepsAnObject(Plugin):
    name = "keeps_object"

    def init(self):
        return {"last": None}

    def update(self, stats, weights, state):
        return weights, {"last": _Opaque()}


def test_a_state_holding_an_object_is_refused_on_save_and_on_load():
    """It used to be saved, and then broke torch.load(weights_only=True) of the whole checkpoint."""
    opt = _balancer([_KeepsAnObject()], steps=1)
    with pytest.raises(StateDictError, match=r"balancer\.states\.keeps_object\.last: found `<.*_Opaque.*weights_only"):
        opt.state_dict()
    section = _balancer([_KeepsAnObject()], steps=0).balancer_state_dict()
    section["states"]["keeps_object"]["last"] = {1, 2}  # e.g. from a torch.load(weights_only=False)
    with pytest.raises(StateDictError, match=r"balancer\.states\.keeps_object\.last: found `\{1, 2\}` \(set\)"):
        opt.load_balancer_state_dict(section)


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, (*path, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _nodes(item, (*path, i))


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=3), st.just(_Opaque())
)
_TENSORS = st.builds(
    lambda dtype, shape, fill: torch.full(shape, fill, dtype=torch.float64).to(dtype),
    st.sampled_from([torch.float64, torch.float32, torch.int64, torch.bool]),
    st.sampled_from([(), (0,), (3,), (1, 3), (3, 3)]),
    st.sampled_from([0.0, 0.5, -1.0, 2.0, 1e300, float("nan"), float("inf")]),
)
_VALUES = st.recursive(
    _SCALARS | _TENSORS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_corruption_loads_faithfully_or_raises_state_dict_error(data):
    valid = _saved_section()
    section = copy.deepcopy(valid)
    for _ in range(data.draw(st.integers(1, 2))):
        paths = list(_nodes(section))[1:]
        tensors = [q for q in paths if isinstance(functools.reduce(lambda n, k: n[k], q, section), torch.Tensor)]
        path = data.draw(st.sampled_from(tensors if tensors and data.draw(st.booleans()) else paths))
        *parents, last = path
        parent = functools.reduce(lambda node, key: node[key], parents, section)
        action = data.draw(st.sampled_from(["replace", "delete", "add", "element", "scale"]))
        target = parent[last]
        if action == "element" and isinstance(target, torch.Tensor) and target.numel():
            target = target.clone()
            target.view(-1)[data.draw(st.integers(0, target.numel() - 1))] = data.draw(
                st.sampled_from([-1.0, 1e300, float("nan"), float("-inf"), 2.0])
            )
            parent[last] = target if isinstance(parent, dict | list) else parent[last]
        elif action == "scale" and isinstance(target, torch.Tensor) and isinstance(parent, dict | list):
            parent[last] = target * data.draw(st.sampled_from([0.5, 2.0, -1.0, 1e-300]))
        elif action == "delete" and isinstance(parent, dict | list):
            del parent[last]
        elif action == "add" and isinstance(target, dict):
            target[data.draw(st.text(max_size=3) | st.integers(0, 3))] = data.draw(_VALUES)
        elif isinstance(parent, dict | list):
            parent[last] = data.draw(_VALUES)
    opt = _balancer(steps=0)
    try:
        opt.load_balancer_state_dict(copy.deepcopy(section))
    except StateDictError as exc:
        event(f"refused: {str(exc).split(' is ')[0].split(':')[0][:60]}")
        return
    event("loaded")
    loaded = opt.balancer_state_dict()
    assert _same(loaded["states"], section["states"]) and loaded["step"] == section["step"]
    assert loaded["rows"] == section.get("rows", 0)
    buffer = io.BytesIO()
    torch.save(loaded, buffer)  # whatever loads can be saved and read back with weights_only=True
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


@functools.cache
def _saved_section_once():
    return _balancer(steps=3).balancer_state_dict()


def _saved_section():
    return copy.deepcopy(_saved_section_once())


def test_update_plugin_state_changes_one_state_and_refuses_a_bad_one():
    model = torch.nn.Linear(3, 2)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("task_norm", {"beta": 0.5, "target": "ema"})])
    before = opt.plugin_states["task_norm"]
    seen = []
    opt.update_plugin_state("task_norm", lambda s: seen.append(s) or {**s, "ema_norms": {"a": torch.tensor(2.0)}})
    assert seen[0] is not before  # the change gets a copy
    assert opt.plugin_states["task_norm"]["ema_norms"]["a"].item() == 2.0
    with pytest.raises(PluginError, match="refuses the new state.*State left as it was"):
        opt.update_plugin_state("task_norm", lambda s: {**s, "ema_norms": {"a": torch.tensor(float("nan"))}})
    assert opt.plugin_states["task_norm"]["ema_norms"]["a"].item() == 2.0
    with pytest.raises(KeyError, match="no plugin named 'pcgrad'.*\\['task_norm'\\]"):
        opt.update_plugin_state("pcgrad", lambda s: s)
