"""The combination of a flat buffer by a combine rule, tile by tile (see :mod:`balancer.contract.combine`).

In place of :meth:`FlatBuffer.combine`'s GEMV: ``base = s·ungrouped + rule(s·w ∘ rows)`` over
tiles of columns, each tile of the ``k`` rows gathered once into a scratch matrix (float32 for
half-precision rows), scaled by the weights and handed to the rule with the tiles' global indices.
The group rows are not written, so :meth:`FlatBuffer.revert` undoes it like the GEMV.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from balancer.capture.flat_buffer import FlatBuffer
from balancer.contract.combine import BoundRule, Columns

__all__ = ["combine_by_rule", "rule_tables", "segment_table"]

_MIN_TILE = 1 << 16
_MAX_TILE = 1 << 22  # columns per tile: the scratch is k × this, and the rule's temporaries a few times that
_TILES = 64


def _tiles(n: int) -> Iterator[tuple[int, int]]:
    tile = min(_MAX_TILE, max(_MIN_TILE, math.ceil(n / _TILES)))
    for lo in range(0, n, tile):
        yield lo, min(n, lo + tile)


def segment_table(buf: FlatBuffer, global_starts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(local_starts, deltas)`` on the buffer's device for :class:`~balancer.contract.combine.Columns`:
    parameter ``i`` of ``buf`` occupies local columns from ``buf.offsets[i]`` and its first local
    element has global index ``global_starts[i]``. Consecutive parameters whose global indices
    continue the local ones are merged into one segment."""
    starts: list[int] = []
    deltas: list[int] = []
    for local, glob in zip(buf.offsets[:-1], global_starts, strict=True):
        if not deltas or glob - local != deltas[-1]:
            starts.append(local)
            deltas.append(glob - local)
    if not starts:
        starts, deltas = [0], [0]
    as_long = {"dtype": torch.int64, "device": buf.device}
    return torch.tensor(starts, **as_long), torch.tensor(deltas, **as_long)  # type: ignore[arg-type]


def rule_tables(
    buffers: Sequence[FlatBuffer], params: Sequence[Tensor], shard_start: Callable[[Tensor], int]
) -> list[tuple[Tensor, Tensor]]:
    """:func:`segment_table` of each buffer: the global index runs over every optimizer parameter
    (``params``, in order, whole and flattened); ``shard_start(p)`` is the index within ``p`` of the
    first element this process holds (0 unless sharded)."""
    offset, starts = 0, {}
    for p in params:
        starts[id(p)] = offset
        offset += p.numel()  # a DTensor's numel is that of the whole parameter
    return [segment_table(buf, [starts[id(p)] + shard_start(p) for p in buf.params]) for buf in buffers]


@torch.no_grad()
def combine_by_rule(
    buf: FlatBuffer, m: int, weights: Tensor, scale: float | Tensor, rule: BoundRule, table: tuple[Tensor, Tensor]
) -> None:
    """``base = scale · (ungrouped + rule(scale · w ∘ rows))``, ``.grad`` → ``base`` (``scale``: the
    GradScaler's ``1/scale`` or 1, which the rule sees applied, so a rule need not be homogeneous)."""
    work = torch.float32 if buf.dtype in (torch.float16, torch.bfloat16) else buf.dtype
    factor = scale.to(device=buf.device, dtype=torch.float64) if isinstance(scale, Tensor) else scale
    w = (weights.to(device=buf.device, dtype=torch.float64) * factor).to(work)[:, None]

    def by_rule(base: Tensor, keep: bool) -> None:
        parts = buf.parts(m)
        for lo, hi in _tiles(buf.n):
            tile = parts[0][:, lo:hi] if len(parts) == 1 else torch.cat([p[:, lo:hi] for p in parts])
            out = rule(tile.to(work) * w, Columns(lo, hi, *table))
            if keep:
                part = base[lo:hi]
                if isinstance(scale, Tensor) or scale != 1.0:
                    part.mul_(scale.to(device=buf.device, dtype=part.dtype) if isinstance(scale, Tensor) else scale)
                part.add_(out.to(part.dtype))
            else:
                base[lo:hi].copy_(out)

    buf.write_update(by_rule)
