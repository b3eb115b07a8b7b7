"""Small helpers for continual learning with replay: a reservoir memory and a class mask.

They are what the ``replay_bias`` plugin (GSA, Guo et al., CVPR 2023) needs around it in an
online class-incremental loop, and nothing more::

    memory = ReservoirBuffer(capacity=1000, generator=torch.Generator().manual_seed(0))
    for x, y in stream:                                    # task id `task`
        old_x, old_y, _ = memory.sample(64, exclude_task=task)
        logits = mask_unseen(model(torch.cat([old_x, x])), seen)     # seen: [classes] bool
        ...
        memory.add(x, y, task)                             # after the step, as GSA and ER do
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ReservoirBuffer", "mask_unseen"]


def mask_unseen(logits: Tensor, seen: Tensor) -> Tensor:
    """``logits`` with the columns of classes not seen yet set to ``-inf`` (softmax gives them 0).

    ``seen`` is a ``[classes]`` bool tensor. A fixed-size head with masked columns keeps every
    parameter in the optimizer from the start (no head to grow and re-register per task).
    """
    if seen.dtype != torch.bool or seen.shape != logits.shape[-1:]:
        raise ValueError(
            f"mask_unseen needs a bool mask with one entry per logits column ({logits.shape[-1]}). "
            f"Found shape {tuple(seen.shape)}, dtype {seen.dtype}."
        )
    return logits.masked_fill(~seen.to(logits.device), float("-inf"))


class ReservoirBuffer:
    """A replay memory filled by reservoir sampling (Vitter 1985): after ``n`` samples offered,
    each is held with probability ``capacity / n``, whatever the task it came from.

    Stores inputs, integer labels and task ids as tensors on the device of the first batch.
    ``generator`` (a CPU ``torch.Generator``) makes insertion and sampling reproducible.
    """

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"ReservoirBuffer capacity must be positive. Found {capacity}.")
        self.capacity = capacity
        self.generator = generator
        self.seen = 0  # samples offered so far
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.task: Tensor | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, x: Tensor, y: Tensor, task: int) -> None:
        """Offers each row of ``(x, y)``, from task ``task``, to the memory."""
        x, y = x.detach(), y.detach()
        if self.x is None:
            self.x = x.new_zeros((self.capacity, *x.shape[1:]))
            self.y = y.new_zeros(self.capacity)
            self.task = torch.zeros(self.capacity, dtype=torch.long, device=y.device)
        assert self.y is not None and self.task is not None
        draws = torch.rand(x.shape[0], generator=self.generator).tolist()
        for i, draw in enumerate(draws):
            self.seen += 1
            if self._size < self.capacity:
                slot = self._size
                self._size += 1
            else:
                slot = int(draw * self.seen)
                if slot >= self.capacity:
                    continue
            self.x[slot], self.y[slot], self.task[slot] = x[i], y[i], task

    def indices(self, task: int | None = None, exclude_task: int | None = None) -> Tensor:
        """Slots held, optionally only those of ``task`` or all but those of ``exclude_task``."""
        keep = torch.ones(self._size, dtype=torch.bool)
        if self.task is not None:
            held = self.task[: self._size].cpu()
            if task is not None:
                keep &= held == task
            if exclude_task is not None:
                keep &= held != exclude_task
        return keep.nonzero().flatten()

    def sample(
        self, n: int, *, task: int | None = None, exclude_task: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Up to ``n`` distinct held samples ``(x, y, task)``, uniformly; fewer if fewer are held."""
        if self.x is None or self.y is None or self.task is None:
            raise ValueError("ReservoirBuffer.sample: the memory is empty; add() a batch first.")
        pool = self.indices(task, exclude_task)
        pick = pool[torch.randperm(pool.shape[0], generator=self.generator)[:n]].to(self.y.device)
        return self.x[pick], self.y[pick], self.task[pick]
