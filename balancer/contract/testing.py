"""Conformance checks for plugin authors: run ``check_plugin(MyPlugin())`` in your tests.

Every built-in plugin passes it. The checks, each failing with an ``AssertionError`` that says
which property broke and on what input:

- weights are a finite ``[k]`` tensor for zero, tiny (1e-30), unit and huge (1e30) gradient norms,
  when one group's gradient is zero, for an opposite pair, a duplicated gradient and norms
  spread from 1e-12 to 1e12;
- ``update`` does not synchronise with the device (no ``.item()``, ``bool()``, ``float()``,
  ``.tolist()`` on tensors) and does not modify the state it is given;
- permutation equivariance: permuting the groups permutes the weights the same way;
- state round trip: the state after some updates survives ``torch.save`` +
  ``torch.load(weights_only=True)``, and the loaded state produces the same next weights;
- stable state structure: the same keys and types after ``init`` and after updates, and the
  same shapes and dtypes from one update to the next;
- every state ``init``, ``update`` and ``merge_tap_stats`` return passes the plugin's own
  ``check_state`` (what a checkpoint load runs): tensors and Python scalars only, finite values
  except the "unknown" markers the plugin declares in ``nonfinite_state``.

For tap plugins, pass example events (``tap_events=[tap_event(...)]``); then ``tap`` and
``merge_tap_stats`` are checked the same way: no host sync, nothing modified in place, a finite
gradient of the same shape, tap statistics with the keys of ``init_tap_stats``, and a state that
keeps its structure and survives the round trip after merging.

For combine rules (:class:`~balancer.contract.combine.CombineRule`) ``combine`` is checked too
(:mod:`~balancer.contract.combine_checks`): coordinate-wise, independent of how the columns are
sharded, reproducible from the state, no host sync, finite on adversarial rows.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from balancer.capture.taps import row_groups
from balancer.contract.combine import CombineRule
from balancer.contract.combine_checks import check_combine_rule
from balancer.contract.plugin import Plugin, State, TapPlugin
from balancer.contract.stats import GroupStats
from balancer.contract.tap_event import TapEvent

__all__ = ["check_plugin", "random_stats", "tap_event"]


def random_stats(
    k: int, *, seed: int = 0, scale: float = 1.0, dim: int = 16, step: int = 0, device: torch.device | str = "cpu"
) -> GroupStats:
    """Stats of ``k`` random group gradients in ``dim`` dimensions with norms around ``scale``, on
    ``device`` (drawn on the CPU, so every device gets the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, dim, generator=gen, dtype=torch.float64) * torch.rand(
        k, 1, generator=gen, dtype=torch.float64
    ).add(0.5)
    gram = (grads @ grads.T) * (scale * scale)
    losses = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    names = [f"group{i}" for i in range(k)]
    return GroupStats.from_gram(gram.to(device), names, losses=losses.to(device), step=step)


class _SyncError(AssertionError):
    pass


@contextlib.contextmanager
def _no_host_sync(plugin: str, where: str = "update()") -> Iterator[None]:
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(Tensor, name) for name in names}

    def forbid(name: str) -> Any:
        def raiser(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            raise _SyncError(
                f"Plugin `{plugin}` called Tensor.{name}() in {where}: that synchronises with the device. "
                "Use torch.where/clamp instead of Python branches on tensor values."
            )

        return raiser

    try:
        for name in names:
            setattr(Tensor, name, forbid(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(Tensor, name, fn)


def _snapshot(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and torch.equal(torch.nan_to_num(a.cpu(), nan=1.2345e-7), torch.nan_to_num(b.cpu(), nan=1.2345e-7))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _structure(value: Any, deep: bool) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype) if deep else "tensor"
    if isinstance(value, dict):
        return {k: _structure(v, deep) for k, v in value.items()} if deep else ("dict", tuple(sorted(value)))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_structure(v, deep) for v in value)) if deep else type(value).__name__
    return type(value).__name__


def _update(plugin: Plugin, stats: GroupStats, state: State, weights: Tensor | None = None) -> tuple[Tensor, State]:
    if weights is None:
        weights = torch.ones(stats.num_groups, dtype=torch.float64, device=stats.gram.device)
    before = _snapshot(state)
    with _no_host_sync(plugin.name):
        out, new_state = plugin.update(stats, weights, state)
    assert _equal(before, state), f"Plugin `{plugin.name}` modified the state passed to update() in place."
    assert isinstance(out, Tensor), f"Plugin `{plugin.name}` returned {type(out).__name__}, not a tensor."
    assert out.shape == (stats.num_groups,), (
        f"Plugin `{plugin.name}` returned weights of shape {tuple(out.shape)} for {stats.num_groups} groups."
    )
    assert out.device == stats.gram.device, (
        f"Plugin `{plugin.name}` returned weights on {out.device} for statistics on {stats.gram.device}."
    )
    assert bool(torch.isfinite(out).all()), (
        f"Plugin `{plugin.name}` returned non-finite weights {out.tolist()} for norms {stats.norms.tolist()}."
    )
    _accepts(plugin, new_state, "update()")
    return out, new_state


def _accepts(plugin: Plugin, state: State, where: str) -> None:
    """The plugin's ``check_state`` accepts a state it produced (or a checkpoint of it cannot be loaded)."""
    try:
        plugin.check_state(state)
    except (ValueError, TypeError) as exc:
        raise AssertionError(
            f"Plugin `{plugin.name}` refuses the state its {where} returned: {exc}. A checkpoint holding it "
            "could not be loaded: fix the state, or check_state()/nonfinite_state if the value is legitimate."
        ) from None


def _check_scales(plugin: Plugin, k: int, steps: int, seed: int, device: torch.device | str) -> None:
    _accepts(plugin, plugin.init(), "init()")
    for scale in (0.0, 1e-30, 1.0, 1e30):
        state = plugin.init()
        for t in range(steps):
            _, state = _update(plugin, random_stats(k, seed=seed + t, scale=scale, step=t, device=device), state)
    base = random_stats(k, seed=seed, device=device)
    gram = base.gram.clone()
    gram[0, :] = 0.0
    gram[:, 0] = 0.0
    _update(plugin, GroupStats.from_gram(gram, base.names, losses=base.losses), plugin.init())
    if k == 1:
        return
    if plugin.min_groups == 1:
        single = random_stats(1, seed=seed, device=device)
        _update(plugin, single, plugin.init())
    for gram in _adversarial_grams(k, seed):
        _update(plugin, GroupStats.from_gram(gram.to(device), base.names, losses=base.losses), plugin.init())


def _adversarial_grams(k: int, seed: int) -> list[Tensor]:
    """Gram matrices of degenerate gradient sets: an opposite pair, a duplicated gradient (rank
    deficient), and norms spread from 1e-12 to 1e12."""
    gen = torch.Generator().manual_seed(seed + 7)
    grads = torch.randn(k, 16, generator=gen, dtype=torch.float64)
    opposite = grads.clone()
    opposite[1] = -opposite[0]
    duplicated = grads.clone()
    duplicated[1] = 3.0 * duplicated[0]
    spread = grads * torch.logspace(-12, 12, k, dtype=torch.float64)[:, None]
    return [g @ g.T for g in (opposite, duplicated, spread)]


def _check_permutation(plugin: Plugin, k: int, steps: int, seed: int, rtol: float, device: torch.device | str) -> None:
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 99)).to(device)
    state_a, state_b = plugin.init(), plugin.init()
    for t in range(steps):
        stats = random_stats(k, seed=seed + t, step=t, device=device)
        permuted = GroupStats.from_gram(
            stats.gram[perm][:, perm], [stats.names[i] for i in perm.tolist()], losses=stats.losses[perm], step=t
        )
        w_a, state_a = _update(plugin, stats, state_a)
        w_b, state_b = _update(plugin, permuted, state_b)
        # A weight near 0 is computed to about rtol times the largest one, not to rtol of itself.
        atol = rtol * float(w_a.abs().max())
        assert torch.allclose(w_b, w_a[perm], rtol=rtol, atol=atol), (
            f"Plugin `{plugin.name}` is not permutation equivariant at update {t}: weights {w_a.tolist()}, "
            f"after permuting the groups by {perm.tolist()}: {w_b.tolist()}."
        )


def _round_trip(plugin: Plugin, state: State) -> State:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``, checked equal."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert _equal(loaded, state), f"Plugin `{plugin.name}` state changed in a torch.save/torch.load round trip."
    return loaded


def _check_state(plugin: Plugin, k: int, steps: int, seed: int, device: torch.device | str) -> None:
    state = plugin.init()
    init_shape = _structure(state, deep=False)
    shapes = []
    for t in range(steps):
        _, state = _update(plugin, random_stats(k, seed=seed + t, step=t, device=device), state)
        assert _structure(state, deep=False) == init_shape, (
            f"Plugin `{plugin.name}` changed its state's keys or types: init() gave {init_shape}, "
            f"update {t} gave {_structure(state, deep=False)}."
        )
        shapes.append(_structure(state, deep=True))
    for t in range(1, len(shapes)):
        assert shapes[t] == shapes[0], (
            f"Plugin `{plugin.name}` state changed structure between updates: {shapes[0]} then {shapes[t]}."
        )
    loaded = _round_trip(plugin, state)
    nxt = random_stats(k, seed=seed + steps, step=steps, device=device)
    w_orig, _ = _update(plugin, nxt, state)
    w_load, _ = _update(plugin, nxt, loaded)
    assert torch.equal(w_orig, w_load), f"Plugin `{plugin.name}` gives different weights after a state round trip."


def tap_event(
    value: Tensor,
    group: str | Sequence[str],
    labels: Tensor | None = None,
    grad: Tensor | None = None,
    *,
    seed: int = 0,
) -> TapEvent:
    """A :class:`~balancer.capture.taps.TapEvent` as ``opt.tap(value, group=group, labels=labels)`` would
    produce it; ``grad`` defaults to a random gradient of ``value``'s shape."""
    names, index = row_groups(value, group)
    if grad is None:
        grad = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=value.dtype)
    return TapEvent(grad=grad, value=value.detach(), names=names, group_index=index, labels=labels)


def _check_taps(plugin: TapPlugin, events: Sequence[TapEvent], steps: int) -> None:
    state = plugin.init()
    init_structure = _structure(state, deep=False)
    for t in range(steps):
        tap_stats = plugin.init_tap_stats()
        for event in events:
            before_stats, before_state = _snapshot(tap_stats), _snapshot(state)
            with _no_host_sync(plugin.name, "tap()"):
                grad, new_stats = plugin.tap(event, state, tap_stats)
            assert _equal(before_stats, tap_stats) and _equal(before_state, state), (
                f"Plugin `{plugin.name}` modified the state or tap stats passed to tap() in place."
            )
            assert isinstance(grad, Tensor) and grad.shape == event.grad.shape, (
                f"Plugin `{plugin.name}` tap() returned a gradient of the wrong shape for {tuple(event.grad.shape)}."
            )
            assert bool(torch.isfinite(grad).all()), f"Plugin `{plugin.name}` tap() returned a non-finite gradient."
            assert isinstance(new_stats, dict) and set(new_stats) == set(tap_stats), (
                f"Plugin `{plugin.name}` tap() changed the keys of its tap stats."
            )
            tap_stats = new_stats
        old_state, before_state = state, _snapshot(state)
        with _no_host_sync(plugin.name, "merge_tap_stats()"):
            state = plugin.merge_tap_stats(old_state, tap_stats)
        assert _equal(before_state, old_state), (
            f"Plugin `{plugin.name}` modified the state passed to merge_tap_stats() in place."
        )
        assert _structure(state, deep=False) == init_structure, (
            f"Plugin `{plugin.name}` changed its state's keys or types in merge_tap_stats() at step {t}."
        )
        _accepts(plugin, state, "merge_tap_stats()")
    loaded = _round_trip(plugin, state)
    for event in events:
        g_orig, _ = plugin.tap(event, state, plugin.init_tap_stats())
        g_load, _ = plugin.tap(event, loaded, plugin.init_tap_stats())
        assert torch.equal(g_orig, g_load), f"Plugin `{plugin.name}` rescales differently after a state round trip."


def check_plugin(
    plugin: Plugin,
    *,
    num_groups: int | Sequence[int] = (1, 2, 5),
    steps: int = 4,
    seed: int = 0,
    permutation_equivariant: bool = True,
    rtol: float = 1e-9,
    tap_events: Sequence[TapEvent] = (),
    device: torch.device | str = "cpu",
) -> None:
    """Runs every conformance check on ``plugin``; raises ``AssertionError`` on the first failure.

    ``device``: where the statistics live (``"cuda"`` checks on a GPU that no update synchronises
    with the host and that the weights stay on the device); ``tap_events`` are used as given.
    """
    if tap_events:
        assert isinstance(plugin, TapPlugin), (
            f"Plugin `{plugin.name}` got tap_events but is not a TapPlugin: it never sees tapped gradients."
        )
        _check_taps(plugin, tap_events, steps)
    sizes = [num_groups] if isinstance(num_groups, int) else list(num_groups)
    too_few = [k for k in sizes if k < plugin.min_groups]
    assert not too_few, (
        f"check_plugin was asked for {too_few} groups, but `{plugin.name}` needs at least min_groups = "
        f"{plugin.min_groups}; pass num_groups from {plugin.min_groups} up."
    )
    for k in sizes:
        _check_scales(plugin, k, steps, seed, device)
        _check_state(plugin, k, steps, seed, device)
        if permutation_equivariant and k > 1:
            _check_permutation(plugin, k, steps, seed, rtol, device)
        if isinstance(plugin, CombineRule):
            check_combine_rule(plugin, k, steps, seed, rtol, permutation_equivariant, device)
