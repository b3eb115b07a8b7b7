"""A sampler whose every optimizer step holds every group: ``BalancedTrainer(..., stratify=True)``.

The epoch is cut into chunks of ``step_size`` consecutive indices (per-device batch size x
gradient-accumulation steps x processes: one optimizer step). Each chunk takes from every group its
share of what the groups have left, and at least one example of each group with examples left, so
the mix stays even over the epoch; the chunk is then shuffled, so each micro-batch mixes groups too.
A group with fewer examples than the epoch has steps runs out before the end of the epoch; the
steps after that simply do not hold it (the plugins see the groups present).

The order depends only on ``seed`` and the epoch (``set_epoch``, which ``Trainer`` calls), so a run
resumed from a checkpoint replays it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["StratifiedGroupSampler"]


class StratifiedGroupSampler(torch.utils.data.Sampler[int]):
    """Yields dataset indices so that every ``step_size`` consecutive ones hold every group with examples left.

    Args:
        names: the group of each example, in dataset order.
        step_size: the examples of one optimizer step (>= the number of groups).
        seed: the base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, names: Sequence[str], step_size: int, seed: int) -> None:
        groups = sorted(set(names))
        if step_size < len(groups):
            raise ValueError(
                f"stratify=True: one optimizer step holds {step_size} examples (per-device batch size x "
                f"gradient_accumulation_steps x processes) but the training set has {len(groups)} groups "
                f"{groups}, so no step can hold them all. Raise the batch size or gradient_accumulation_steps, "
                "or set stratify=False."
            )
        self.rows = {g: [i for i, n in enumerate(names) if n == g] for g in groups}
        self.step_size = step_size
        self.seed = seed
        self.epoch = 0
        self._length = len(names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        left = {
            g: [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            for g, rows in self.rows.items()
        }
        remaining = self._length
        while remaining:
            size = min(self.step_size, remaining)
            counts = _chunk_counts({g: len(r) for g, r in left.items()}, size)
            chunk = [i for g, n in counts.items() for i in _take(left[g], n)]
            remaining -= size
            yield from (chunk[j] for j in torch.randperm(size, generator=generator).tolist())


def _chunk_counts(left: dict[str, int], size: int) -> dict[str, int]:
    """How many examples of each group a chunk of ``size`` takes: its share of what is left, by largest
    remainder (ties to the group named first); then every group with examples left but no place takes
    one from the group with the most places, if the chunk has room for every group."""
    present = [g for g, n in left.items() if n > 0]
    total = sum(left[g] for g in present)
    counts = {g: size * left[g] // total for g in present}  # integers: no rounding can overdraw a group
    by_remainder = sorted(present, key=lambda g: -(size * left[g] % total))
    for g in by_remainder[: size - sum(counts.values())]:
        counts[g] += 1
    if len(present) <= size:
        for g in present:
            if counts[g] == 0:
                counts[max(present, key=lambda h: counts[h])] -= 1
                counts[g] = 1
    return counts


def _take(rows: list[int], n: int) -> list[int]:
    taken = rows[:n]
    del rows[:n]
    return taken
