"""Every data-parallel rank must capture the same groups in the same order.

Each capture event (entering a group, stepping; under DDP also every backward pass, see
:mod:`._ddp_passes`) is one small all-reduce of a fingerprint, the CRC-32 of the event's
description. If the ranks disagree, they all take the slow path together, gather the
descriptions, and all raise the same :class:`~balancer.errors.GroupMismatchError` (one line per
distinct event, with the ranks that reached it), instead of one rank waiting forever in a
collective the others never join.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from balancer.errors import GroupMismatchError


class RankAgreement:
    """Checks that all ranks of ``group`` reach the same event; ``device`` carries the collective."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
        self.group = group
        self.device = device or torch.device("cpu")

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks of the group (moved to the collective's device and back)."""
        return self.reduce(tensor, "sum")

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        """``tensor`` reduced over the ranks with ``op``, ``"sum"`` or ``"max"``."""
        moved = tensor.to(self.device, copy=True)
        dist.all_reduce(moved, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=self.group)
        return moved.to(tensor.device)

    def check(self, event: str) -> None:
        code = zlib.crc32(event.encode("utf-8"))
        pair = torch.tensor([code, -code], dtype=torch.int64, device=self.device)
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=self.group)
        high, neg_low = pair.tolist()
        if high == -neg_low:
            return
        events: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(events, event, group=self.group)
        raise GroupMismatchError(
            f"Data-parallel ranks disagree on the groups of this step:\n{describe_ranks(events)}\nEvery rank must "
            "enter the same groups in the same order, run the same forward and backward passes in each (under "
            "no_sync() on every rank or on none), and then call step(). A rank that leaves a group block early "
            "(an exception caught inside the training loop) must not go on alone: re-raise the exception, or "
            "have every rank skip the same micro-batch."
        )


def describe_ranks(events: list[str | None]) -> str:
    """One line per distinct event with the ranks that reached it: ``"  ranks 0-2, 5: enter group 'a'"``."""
    ranks: dict[str | None, list[int]] = {}
    for rank, event in enumerate(events):
        ranks.setdefault(event, []).append(rank)
    return "\n".join(f"  {_ranks(members)}: {event}" for event, members in ranks.items())


def _ranks(members: list[int]) -> str:
    spans: list[list[int]] = []
    for rank in members:
        if spans and spans[-1][1] == rank - 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(members) == 1 else f"ranks {text}"


class RankReductions:
    """Mixin for distributed backends that hold ``_agreement`` (a :class:`RankAgreement`) and
    ``_world`` (the number of ranks): the reductions the :class:`~balancer.contract.backend.Backend` seam asks for."""

    _agreement: RankAgreement
    _world: int

    @property
    def world_size(self) -> int:
        return self._world

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        return self._agreement.reduce(tensor, op)

    def reduce_losses(self, losses: Tensor) -> Tensor:
        return self._agreement.sum(losses) / self._world
