"""The conformance checks :func:`~balancer.contract.testing.check_plugin` adds for a combine rule.

- ``combine`` returns a finite ``[c]`` tensor of the rows' dtype on their device, for rows in
  float32 and float64 at scales 0, 1e-30, 1, 1e30, with a zero row, an opposite pair and norms
  spread over 24 orders of magnitude; it does not synchronise with the device and does not write
  its inputs;
- it is coordinate-wise and independent of the sharding: the columns combined in pieces (as
  ranks or tiles hold them), or reordered together with their global indices, give exactly the
  same numbers as all columns at once; and it is reproducible (same state, same output);
- the state of a few updates survives ``torch.save`` + ``torch.load(weights_only=True)`` and
  gives the same output;
- permuting the groups (rows and stats) leaves the output unchanged, to ``rtol``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from balancer.contract.combine import Columns, CombineRule
from balancer.contract.stats import GroupStats

__all__ = ["check_combine_rule"]

_GLOBAL_START = (1 << 33) + 12345  # past 2**32: the high bits of the global index take part
_COLUMNS = 257


def _columns(lo: int, hi: int, starts: list[int], deltas: list[int], device: Any) -> Columns:
    as_long = {"dtype": torch.int64, "device": device}
    return Columns(lo, hi, torch.tensor(starts, **as_long), torch.tensor(deltas, **as_long))


def _rows(k: int, seed: int, dtype: torch.dtype, device: Any) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, _COLUMNS, generator=gen, dtype=torch.float64)
    rows[:, :7] = 0.0  # columns where every group is zero
    return rows.to(device=device, dtype=dtype)


def _stats(rows: Tensor, names: list[str], step: int) -> GroupStats:
    wide = rows.to(torch.float64)
    return GroupStats.from_gram(wide @ wide.T, names, step=step)


def _combine(rule: CombineRule[Any], rows: Tensor, columns: Columns, state: Any) -> Tensor:
    from balancer.contract.testing import _equal, _no_host_sync, _snapshot

    before, before_state = rows.clone(), _snapshot(state)
    with _no_host_sync(rule.name, "combine()"):
        out = rule.combine(rows, columns, state)
    assert torch.equal(before, rows) and _equal(before_state, state), (
        f"Plugin `{rule.name}` modified the rows or the state passed to combine() in place."
    )
    c = columns.hi - columns.lo
    assert isinstance(out, Tensor) and out.shape == (c,), (
        f"Plugin `{rule.name}` combine() returned {getattr(out, 'shape', type(out))} for {c} columns."
    )
    assert out.dtype == rows.dtype and out.device == rows.device, (
        f"Plugin `{rule.name}` combine() returned {out.dtype} on {out.device} "
        f"for rows of {rows.dtype} on {rows.device}."
    )
    assert bool(torch.isfinite(out).all()), f"Plugin `{rule.name}` combine() returned non-finite values."
    return out


def _state_after(rule: CombineRule[Any], rows: Tensor, names: list[str], steps: int) -> Any:
    from balancer.contract.testing import _update

    state = rule.init()
    for t in range(steps):
        _, state = _update(rule, _stats(rows, names, t), state)
    return state


def check_combine_rule(
    rule: CombineRule[Any], k: int, steps: int, seed: int, rtol: float, permutation: bool, device: Any
) -> None:
    """Runs the checks of the module docstring for ``k`` groups."""
    names = [f"group{i}" for i in range(k)]
    n, start = _COLUMNS, _GLOBAL_START
    for dtype in (torch.float32, torch.float64):
        rows = _rows(k, seed, dtype, device)
        state = _state_after(rule, rows, names, steps)
        whole = _combine(rule, rows, _columns(0, n, [0], [start], device), state)
        again = _combine(rule, rows, _columns(0, n, [0], [start], device), state)
        assert torch.equal(whole, again), f"Plugin `{rule.name}` combine() is not reproducible from its state."
        cuts = [0, 1, 100, 101, n]
        pieces = [
            _combine(rule, rows[:, a:b], _columns(a, b, [0], [start], device), state)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        assert torch.equal(torch.cat(pieces), whole), (
            f"Plugin `{rule.name}` combine() gives other numbers when the columns come in pieces (ranks, tiles): "
            "it must be coordinate-wise, a function of each column and its global index only."
        )
        h = 60
        swapped = torch.cat([rows[:, h:], rows[:, :h]], dim=1)
        moved = _combine(rule, swapped, _columns(0, n, [0, n - h], [start + h, start - (n - h)], device), state)
        assert torch.equal(moved, torch.cat([whole[h:], whole[:h]])), (
            f"Plugin `{rule.name}` combine() depends on the local position of a column, not its global index."
        )
        from balancer.contract.testing import _round_trip

        loaded = _round_trip(rule, state)
        assert torch.equal(_combine(rule, rows, _columns(0, n, [0], [start], device), loaded), whole), (
            f"Plugin `{rule.name}` combine() gives other numbers after a state round trip."
        )
        _check_adversarial(rule, rows, names, steps, device)
        if permutation and k > 1:
            perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 99)).tolist()
            permuted_state = _state_after(rule, rows[perm], [names[i] for i in perm], steps)
            out = _combine(rule, rows[perm], _columns(0, n, [0], [start], device), permuted_state)
            tol = (rtol if dtype == torch.float64 else 1e-6) * float(rows.abs().max()) * k  # summation order
            assert torch.allclose(out, whole, rtol=0.0, atol=tol), (
                f"Plugin `{rule.name}` combine() changes when the groups are permuted by {perm}."
            )


def _check_adversarial(rule: CombineRule[Any], rows: Tensor, names: list[str], steps: int, device: Any) -> None:
    k, n = rows.shape
    cases = [rows * scale for scale in (0.0, 1e-30, 1e30)]
    zero_row = rows.clone()
    zero_row[0] = 0.0
    cases.append(zero_row)
    if k > 1:
        opposite = rows.clone()
        opposite[1] = -opposite[0]
        spread = rows.to(torch.float64) * torch.logspace(-12, 12, k, dtype=torch.float64, device=device)[:, None]
        cases += [opposite, spread.to(rows.dtype)]
    for case in cases:
        state = _state_after(rule, case, names, steps)
        _combine(rule, case, _columns(0, n, [0], [_GLOBAL_START], device), state)
