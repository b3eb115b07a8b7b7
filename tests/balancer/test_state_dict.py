"""Checkpoints: plugin state in the state dict, weights_only loading, exact resume in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from balancer import Balancer, Plugin, StateDictError

TRAIN = textwrap.dedent(
    """
    import sys, torch
    from balancer import Balancer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def batches(step):
        gen = torch.Generator().manual_seed(step)
        return {f"g{i}": (torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * 10.0**i) for i in range(3)}

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
