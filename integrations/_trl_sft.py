"""``BalancedSFTTrainer``: TRL's ``SFTTrainer`` on several tasks at once, one group per task.

The group column (``group_by=``) survives ``SFTTrainer``'s dataset preparation (formatting,
ChatML conversion, EOS, tokenization and label building keep the other columns) and, through
:class:`~balancer.integrations._hf_groups.GroupColumnCollator`, its collator. Each micro-batch is
split by group and ``SFTTrainer.compute_loss`` runs once per group, so every group is a forward
and a backward of its own rows, inside ``opt.group(name)``:

* with ``num_items_in_batch`` (causal LMs, the usual case) ``SFTTrainer`` divides the summed
  per-token loss (``"nll"`` or ``"dft"``; completion-only and assistant-only labels are already
  -100) by it, so the group losses add up to the batch loss as they are; without it the loss is a
  token mean and each group's is weighted by its share of the (shifted) label tokens;
* the metrics ``SFTTrainer`` logs per call (``entropy``, ``mean_token_accuracy``, ``num_tokens``)
  are those of the whole micro-batch, as one ``compute_loss`` call would log them: inside the
  group calls they are kept local (``gather_for_metrics`` is the identity there), then their sums
  are gathered once per micro-batch;
* with several ranks every rank runs the groups present on any rank, in one order, a group it
  has nothing of with a zero loss (DeepSpeed's reduction at each group boundary and ZeRO-3's
  parameter gathers are collectives, so all ranks must run the same forwards and backwards).

Refused when the trainer is built (:class:`~balancer.integrations._hf_groups.TrainerSetupError`):
``packing=True`` (rows hold examples of several groups, and packing drops the group column),
``padding_free=True`` (the micro-batch is flattened into one row) and a MoE router auxiliary
loss (``router_aux_loss_coef`` not 0: it depends on the routing of the whole micro-batch, so
per-group forwards cannot reproduce it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ._hf_groups import (
    GROUP_KEY,
    GroupingError,
    TrainerSetupError,
    label_count,
    several_ranks,
    split_by_group,
)
from .transformers import BalancerTrainerMixin, GroupLosses

try:
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("BalancedSFTTrainer needs TRL: pip install 'gradient-balancer[trl]'") from exc

__all__ = ["BalancedSFTTrainer"]

# Metrics that SFTTrainer.compute_loss records per call and that are combined over the groups here.
_TOKEN_MEANS = ("entropy", "mean_token_accuracy")  # each a sum over label tokens divided by their count


def _ungroupable(config: Any) -> list[str]:
    """The settings of an ``SFTConfig`` (or ``TrainingArguments``) whose rows mix or lose the groups."""
    found = []
    if getattr(config, "packing", False):
        found.append(
            "packing=True puts examples of different groups into one row (and packing keeps only input_ids and "
            "labels, dropping the group column); fix: packing=False"
        )
    if getattr(config, "padding_free", False):
        found.append(
            "padding_free=True flattens each micro-batch into a single row, which cannot be split by group; "
            "fix: padding_free=False"
        )
    return found


def _refuse(problems: list[str]) -> None:
    if problems:
        raise TrainerSetupError("BalancedSFTTrainer cannot split the micro-batches by group: " + "; ".join(problems))


class _MicroBatchMetrics:
    """Collects what ``SFTTrainer.compute_loss`` records in each group call of one micro-batch, then
    records it once, for the whole micro-batch, as a single call would have.

    Inside the group calls ``accelerator.gather_for_metrics`` is the identity, so each call's
    ``entropy`` and ``mean_token_accuracy`` are this rank's token means over the group's rows and
    its ``num_tokens`` increment counts this rank's tokens. Times the group's label-token count
    they give back the sums; :meth:`close` gathers the sums across ranks once and appends
    ``sum / count`` (what ``SFTTrainer`` computes for a batch). Calls for a group this rank has
    no rows of (run only to keep the ranks in step) are rolled back. Other metrics keep one entry
    per group call.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.store = trainer._metrics["train"]
        self.accelerator = trainer.accelerator
        self.lengths = {key: len(self.store[key]) for key in _TOKEN_MEANS}
        self.tokens_before = trainer._total_train_tokens
        self.sums = torch.zeros(4, dtype=torch.float64)  # entropy sum, correct tokens, label tokens, tokens

    def __enter__(self) -> _MicroBatchMetrics:
        self.accelerator.gather_for_metrics = _local  # an instance attribute: shadows the method until __exit__
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.accelerator.gather_for_metrics
        if exc[0] is None:
            self.close()

    def measure(self, loss_of: Callable[[dict[str, Any]], Tensor], part: dict[str, Any]) -> Tensor:
        """``loss_of(part)`` (this group's ``compute_loss``); keeps what it recorded as sums."""
        before = {key: len(self.store[key]) for key in _TOKEN_MEANS}
        tokens = self.trainer._total_train_tokens
        loss = loss_of(part)
        count = float(label_count(part, shifted=True))
        entropy, accuracy = (self.store[k][-1] if len(self.store[k]) > before[k] else 0.0 for k in _TOKEN_MEANS)
        self.sums += torch.tensor([entropy * count, accuracy * count, count, self.trainer._total_train_tokens - tokens])
        return loss

    def discard(self, loss_of: Callable[[dict[str, Any]], Tensor], part: dict[str, Any]) -> Tensor:
        """``loss_of(part)``, with whatever it recorded rolled back."""
        lengths = {key: len(values) for key, values in self.store.items()}
        tokens = self.trainer._total_train_tokens
        loss = loss_of(part)
        for key, values in list(self.store.items()):
            del values[lengths.get(key, 0) :]
        self.trainer._total_train_tokens = tokens
        return loss

    def close(self) -> None:
        """Records the micro-batch's metrics: one entry each, gathered over the ranks once."""
        accelerator = self.accelerator
        device = accelerator.device if accelerator.num_processes > 1 else torch.device("cpu")
        gathered = accelerator.gather_for_metrics(self.sums.to(device)).reshape(-1, 4).sum(0).tolist()
        entropy, correct, count, tokens = gathered
        for key, value in zip(_TOKEN_MEANS, (entropy, correct), strict=True):
            del self.store[key][self.lengths[key] :]
            self.store[key].append(value / count if count > 0 else 0.0)
        self.trainer._total_train_tokens = self.tokens_before + int(round(tokens))
        self.store["num_tokens"] = [self.trainer._total_train_tokens]


def _local(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


class BalancedSFTTrainer(BalancerTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose optimizer is a Balancer and whose groups are the values of a dataset
    column: multi-task supervised fine-tuning with per-task gradients (see :mod:`._trl_sft`).

    Takes ``SFTTrainer``'s arguments plus ``balancer=``, ``group_by=`` and ``stratify=`` of
    :class:`~balancer.integrations.transformers.BalancerTrainerMixin`. Any dataset type that
    ``SFTTrainer`` prepares works (plain text, ``dataset_text_field``, a ``formatting_func``,
    conversational ``messages``, prompt-completion with completion-only loss, assistant-only loss,
    pre-tokenized), as long as it has the group column. With no plugin the run equals
    ``SFTTrainer``'s on the same data, to float rounding, including its logged metrics.

    Refused when the trainer is built: ``packing=True``, ``padding_free=True`` (or a padding-free
    collator) and a MoE router auxiliary loss; under ``deepspeed=``, what
    :class:`~balancer.integrations.transformers.BalancedTrainer` refuses (gradient accumulation,
    offload, ...).

    Usage (``model``, ``tokenizer`` and ``dataset`` are yours; the dataset has a ``task`` column)::

        trainer = BalancedSFTTrainer(
            model=model,
            args=SFTConfig(output_dir="out", max_grad_norm=1.0),
            train_dataset=dataset,  # "text" (or "messages", or "prompt"/"completion") and "task"
            processing_class=tokenizer,
            balancer=["task_norm"],
            group_by="task",
        )
        trainer.train()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ``args`` is SFTTrainer's second parameter; refused before the dataset is tokenized (and packed)
        _refuse(_ungroupable(kwargs.get("args", args[1] if len(args) > 1 else None)))
        super().__init__(*args, **kwargs)

    def _check_balancer_setup(self) -> None:
        super()._check_balancer_setup()
        problems = _ungroupable(self.args)
        collator = self.data_collator
        if isinstance(collator, DataCollatorForLanguageModeling) and collator.padding_free and not problems:
            problems.append("the data collator is padding-free (one row per micro-batch); fix: padding_free=False")
        if getattr(self, "aux_loss_enabled", False):
            problems.append(
                f"router_aux_loss_coef = {self.router_aux_loss_coef} adds the MoE load-balancing loss, which depends "
                "on the routing of the whole micro-batch, so per-group forwards cannot reproduce it; fix: "
                "router_aux_loss_coef=0.0"
            )
        _refuse(problems)

    def group_losses(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> GroupLosses:
        """One ``SFTTrainer.compute_loss`` per group of the micro-batch, yielded as ``(group, loss)`` pairs
        adding up to the batch loss (each group's backward runs before the next group's forward); the
        micro-batch's metrics are recorded once (see :class:`_MicroBatchMetrics`).

        With ``num_items_in_batch`` every group's loss is divided by it (as ``SFTTrainer`` divides the
        batch's); without it each group's token-mean loss is weighted by its share of the label tokens.
        With several ranks, each runs the groups present on any rank in one order; a group a rank has
        no rows of gets a zero loss through the model there (a forward of another group, times 0).
        """
        return self._split_by_group(model, inputs, num_items_in_batch)

    def _split_by_group(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None
    ) -> Iterator[tuple[str, Tensor]]:
        if GROUP_KEY not in inputs:
            raise GroupingError(
                "The batch carries no group names: set group_by='<column>' on the trainer, or override group_losses."
            )
        inputs = dict(inputs)
        names = list(inputs.pop(GROUP_KEY))
        parts = split_by_group(inputs, names)
        order = self.ranks_group_order(list(parts))
        total = None if num_items_in_batch is not None else label_count(inputs, shifted=True)

        def loss_of(part: dict[str, Any]) -> Tensor:
            return self.compute_loss(model, dict(part), num_items_in_batch=num_items_in_batch)

        with _MicroBatchMetrics(self) as metrics:
            for name in order:
                part = parts.get(name)
                if part is None:
                    yield name, metrics.discard(loss_of, next(iter(parts.values()))) * 0.0
                    continue
                loss = metrics.measure(loss_of, part)
                if total is not None:
                    count = label_count(part, shifted=True)
                    if int(count) == 0 and not several_ranks():
                        continue  # adds nothing to a token mean
                    loss = loss * (count / torch.as_tensor(total).clamp(min=1))
                yield name, loss
