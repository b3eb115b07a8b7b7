"""Groups of a ``transformers.Trainer`` batch: carried through the collator, then split.

The group column of the training set (``group_by``) is not an argument of the model's
``forward``, so ``Trainer`` would drop it; :class:`GroupColumnCollator` takes it out of every
example before the user's collator runs and puts the group names back into the batch under
:data:`GROUP_KEY`. :func:`split_by_group` then cuts the collated batch into one sub-batch per
group, and :func:`label_count` counts what a mean-reduced loss averages over, so that the group
losses add up to the batch loss exactly.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from balancer.errors import BalancerError, CaptureError

__all__ = [
    "GROUP_KEY",
    "GroupColumnCollator",
    "GroupingError",
    "TrainerSetupError",
    "group_name",
    "label_count",
    "ranks_group_order",
    "several_ranks",
    "split_by_group",
]

GROUP_KEY = "balancer_group"  # where the collated batch carries one group name per example
IGNORE_INDEX = -100  # the label transformers' losses skip


class GroupingError(CaptureError):
    """A batch cannot be split into groups as configured."""


class TrainerSetupError(BalancerError, ValueError):
    """A trainer's arguments would bypass the Balancer or ask for what it cannot do."""


def group_name(value: Any, column: str) -> str:
    """A group name (``str``) from a dataset value: a string, an integer or a 0-d integer tensor."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise GroupingError(
        f"group_by column `{column}` holds `{value!r}` ({type(value).__name__}); group values must be strings "
        "or integers (the group name is their str())."
    )


class GroupColumnCollator:
    """Wraps a data collator: takes the group column out of each example, collates the rest, and
    returns the batch with the group names under :data:`GROUP_KEY`."""

    def __init__(self, collator: Callable[[list[Any]], Any], column: str) -> None:
        self.collator = collator
        self.column = column

    def __call__(self, features: list[Any]) -> Any:
        names, rest = [], []
        for i, feature in enumerate(features):
            if not isinstance(feature, Mapping) or self.column not in feature:
                found = sorted(feature) if isinstance(feature, Mapping) else type(feature).__name__
                raise GroupingError(
                    f"group_by='{self.column}': example {i} of the batch has no `{self.column}` field (found "
                    f"{found}). Add the column to the training set, or pass the name of the column that "
                    "holds each example's group."
                )
            names.append(group_name(feature[self.column], self.column))
            rest.append({k: v for k, v in feature.items() if k != self.column})
        batch = self.collator(rest)
        batch[GROUP_KEY] = names
        return batch


def split_by_group(inputs: Mapping[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """One sub-batch per group present, in order of first appearance: every tensor (and list) whose
    first dimension is the batch is indexed by the group's rows; anything else is shared as is.

    A batch of a single group is returned unchanged (no copy), so it runs exactly as in ``Trainer``.
    """
    batch = len(names)
    order = list(dict.fromkeys(names))
    if len(order) == 1:
        return {order[0]: dict(inputs)}
    rows = {name: [i for i, n in enumerate(names) if n == name] for name in order}
    for key, value in inputs.items():
        size = value.shape[0] if isinstance(value, Tensor) and value.dim() > 0 else None
        if size is not None and size != batch:
            raise GroupingError(
                f"Cannot split the batch by group: `{key}` has shape {tuple(value.shape)}, whose first dimension "
                f"is not the {batch} examples (a padding-free or packed collator?). Use a collator that keeps one "
                "row per example, or override `group_losses` to compute each group's loss yourself."
            )
    parts: dict[str, dict[str, Any]] = {}
    for name, idx in rows.items():
        part: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                part[key] = value[torch.tensor(idx, device=value.device)]
            elif isinstance(value, list | tuple) and len(value) == batch:
                part[key] = [value[i] for i in idx]
            else:
                part[key] = value
        parts[name] = part
    return parts


def label_count(inputs: Mapping[str, Any], shifted: bool) -> Tensor | int:
    """What a mean-reduced loss of ``inputs`` averages over, counted as ``Trainer`` counts
    ``num_items_in_batch``: label tokens other than -100 (``labels[..., 1:]`` for causal LMs, or
    ``shift_labels``); the number of examples when the batch has no labels."""
    if isinstance(inputs.get("shift_labels"), Tensor):
        return inputs["shift_labels"].ne(IGNORE_INDEX).sum()
    labels = inputs.get("labels")
    if isinstance(labels, Tensor):
        return (labels[..., 1:] if shifted else labels).ne(IGNORE_INDEX).sum()
    for value in inputs.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise GroupingError("Cannot count the examples of a batch that holds no tensor; override `group_losses`.")


def several_ranks() -> bool:
    """Whether this process is one of several data-parallel ranks (a process group of size > 1)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks_group_order(present: list[str]) -> list[str]:
    """The groups every data-parallel rank runs in this micro-batch: those present on any rank, in
    order of first appearance over the ranks (rank 0 first); ``present`` itself with one process.
    One ``all_gather_object`` of the names. Every multi-rank setting needs all ranks to run the same
    groups in the same order: the Balancer checks that the ranks captured the same groups
    (DDP, FSDP), DeepSpeed reduces at each group boundary, and a forward may itself be a collective
    (DDP's buffer broadcast, FSDP's parameter gathers). A rank without examples of a group runs
    it with a zero loss."""
    import torch.distributed as dist

    if not several_ranks():
        return list(present)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, present)
    return list(dict.fromkeys(name for names in gathered for name in names or []))
