"""The training set's tasks, as ``BalancedGRPOTrainer`` reads them: their names and the stratified sampler.

* :func:`task_vocabulary`: the sorted task names of the ``group_by`` column, read at construction
  (the trainer gives each completion its task's index in this list).
* :class:`StratifiedRepeatSampler`: the prompt order of ``stratify=True``, TRL's ``RepeatSampler``
  order with every generation batch holding every task that has prompts left;
  :func:`stratified_repeat_sampler` builds it for a trainer, or refuses the set-up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._hf_groups import TrainerSetupError, group_name
from ._hf_sampler import StratifiedGroupSampler

__all__ = ["StratifiedRepeatSampler", "stratified_repeat_sampler", "task_vocabulary"]


class StratifiedRepeatSampler(torch.utils.data.Sampler[int]):
    """TRL's ``RepeatSampler`` order, with every generation batch holding every task that has prompts left.

    Prompts come in the order of :class:`~balancer.integrations._hf_sampler.StratifiedGroupSampler`
    with one generation batch (``batch_size`` prompts) as its step; as in ``RepeatSampler``, a last
    incomplete batch is dropped, each batch is yielded ``repeat_count`` times and each prompt
    ``mini_repeat_count`` times in a row. Deterministic in ``seed`` and the epoch (``set_epoch``).
    """

    def __init__(
        self, names: Sequence[str], mini_repeat_count: int, batch_size: int, repeat_count: int, seed: int
    ) -> None:
        self.order = StratifiedGroupSampler(names, batch_size, seed)
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order) // self.batch_size * self.batch_size * self.mini_repeat_count * self.repeat_count

    def __iter__(self) -> Iterator[int]:
        prompts = list(self.order)
        for start in range(0, len(prompts) - self.batch_size + 1, self.batch_size):
            batch = prompts[start : start + self.batch_size]
            for _ in range(self.repeat_count):
                for index in batch:
                    yield from [index] * self.mini_repeat_count


def stratified_repeat_sampler(
    dataset: Any, column: str, args: Any, num_generations: int, num_iterations: int
) -> StratifiedRepeatSampler:
    """The sampler of ``stratify=True`` for a ``GRPOConfig`` (``args``): generation batches of
    ``generation_batch_size // num_generations`` prompts, each repeated ``num_iterations × steps_per_generation``
    times, as TRL's own sampler does. Refuses a dataset without columns and a batch with fewer prompts than tasks."""
    if not isinstance(getattr(dataset, "column_names", None), list):
        raise TrainerSetupError("stratify=True needs a map-style training set (a datasets.Dataset with columns).")
    names = [group_name(v, column) for v in dataset[column]]
    prompts = args.generation_batch_size // num_generations
    tasks = sorted(set(names))
    if prompts < len(tasks):
        raise TrainerSetupError(
            f"stratify=True: a generation batch holds {prompts} prompts (generation_batch_size // num_generations) "
            f"but there are {len(tasks)} tasks {tasks}. Raise generation_batch_size or set stratify=False."
        )
    seed = args.data_seed if args.data_seed is not None else args.seed
    repeats = num_iterations * args.steps_per_generation
    return StratifiedRepeatSampler(names, num_generations, prompts, repeats, seed)


def task_vocabulary(dataset: Any, column: str) -> list[str]:
    """The sorted task names of a map-style training set (empty for an IterableDataset: learnt as it streams)."""
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return []
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        if column not in names:
            raise TrainerSetupError(
                f"group_by='{column}' is not a column of the training set (columns: {names}). Add a column naming "
                "each prompt's task, or pass the right column name."
            )
        values = list(dataset[column])
    else:
        values = [dataset[i][column] for i in range(len(dataset))]
    return sorted({group_name(v, column) for v in values})
