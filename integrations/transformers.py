"""``transformers.Trainer`` with a :class:`~balancer.Balancer`: ``BalancedTrainer`` and ``BalancerTrainerMixin``.

``BalancedTrainer(model=..., args=TrainingArguments(...), train_dataset=..., balancer=["task_norm"],
group_by="task")`` trains like ``Trainer`` with these changes:

* the optimizer ``Trainer`` creates (its AdamW, or ``args.optim`` / ``optimizer_cls_and_kwargs``, with
  its weight-decay parameter groups) is wrapped in a Balancer; LR schedulers act on it unchanged;
* every micro-batch is split by the ``group_by`` column, one forward and one backward per group
  inside ``opt.group(name)``, each group's loss weighted so that the group losses add up to the
  batch loss exactly as ``Trainer`` scales it (``num_items_in_batch``, gradient accumulation);
  or override :meth:`BalancerTrainerMixin.group_losses`;
* ``args.max_grad_norm`` clips the balanced update (``opt.clip_grad_norm_``) and the logged
  ``grad_norm`` is that update's norm;
* each logging step adds ``balancer/norm/<group>``, ``balancer/weight/<group>`` and
  ``balancer/<plugin>/<metric>`` to the logs, so every ``report_to`` tracker receives them;
* checkpoints carry the plugin states (the Balancer's state dict), so resuming is exact;
* with ``TrainingArguments(deepspeed=...)`` (ZeRO 0-3 through accelerate's DeepSpeed plugin)
  DeepSpeed gets the plain optimizer and the Balancer is built on the engine, with the exact
  statistics of :mod:`balancer.integrations.deepspeed`; DeepSpeed's ``gradient_clipping`` (Trainer's
  ``max_grad_norm``) clips the balanced update, and its checkpoints carry the Balancer's section.
  Refused before training: gradient accumulation, offload, pipeline/tensor/sequence parallelism,
  fp16 (:mod:`._hf_trainer_deepspeed`).

With no plugin the run equals ``Trainer``'s on the same data, to float rounding. Needs the
``hf`` extra: ``pip install 'gradient-balancer[hf]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor

from balancer._unwrap import unwrap
from balancer.optimizer import Balancer

from ._hf_groups import (
    GROUP_KEY,
    GroupColumnCollator,
    GroupingError,
    TrainerSetupError,
    group_name,
    label_count,
    ranks_group_order,
    several_ranks,
    split_by_group,
)
from ._hf_sampler import StratifiedGroupSampler
from ._hf_setup import BalancerSpec, balancer_logs, resolve_spec
from ._hf_trainer_deepspeed import check_trainer_deepspeed, engine_balancer, load_checkpoint_after_prepare

try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "balancer.integrations.transformers needs transformers: pip install 'gradient-balancer[hf]'"
    ) from exc

__all__ = ["BalancedTrainer", "BalancerTrainerMixin", "GroupingError", "TrainerSetupError", "balancer_logs"]

# Optimizers that step inside the backward pass (or per layer): no step is left for a Balancer to weigh.
_FUSED_OPTIMIZERS = ("lomo", "layerwise")

#: What ``group_losses`` returns: ``{group: loss}``, or ``(group, loss)`` pairs taken one at a time.
GroupLosses: TypeAlias = Mapping[str, Tensor] | Iterator[tuple[str, Tensor]]


def _each_in_context(
    pairs: Iterator[tuple[str, Tensor]], context: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Iterator[tuple[str, Tensor]]:
    """The pairs, each produced (its group's forward) inside a fresh ``context()`` (Trainer's autocast);
    the backward of one pair runs outside it, before the next pair's forward."""
    while True:
        with context():
            pair = next(pairs, None)
        if pair is None:
            return
        yield pair


class BalancerTrainerMixin:
    """Adds a Balancer to any ``transformers.Trainer`` subclass: ``class T(BalancerTrainerMixin, SomeTrainer)``.

    Args:
        balancer: the plugins (a list, as ``Balancer(plugins=...)`` takes), or a config (a dict, a
            :class:`~balancer.BalancerConfig` or a JSON file path, as ``Balancer.from_config``);
            ``None``: no plugin (the plain update, still grouped and logged). Clip with
            ``TrainingArguments.max_grad_norm``, not in the config.
        group_by: the training-set column naming each example's group (strings or integers; the
            group name is their ``str``). Kept through ``remove_unused_columns`` and the collator;
            each micro-batch runs one forward and backward per group present. Not needed when a
            subclass overrides :meth:`group_losses`.
        stratify: sample so that every optimizer step (all its gradient-accumulation micro-batches)
            holds every group that has examples left in the epoch (see
            :class:`~balancer.integrations._hf_sampler.StratifiedGroupSampler`); needs ``group_by``.

    Other arguments go to the trainer. ``optimizers=(opt, scheduler)`` must hold a Balancer (then
    ``balancer=`` is not given); a plain optimizer is refused, since its steps would balance nothing.
    """

    group_by: str | None
    stratify: bool

    def __init__(
        self,
        *args: Any,
        balancer: BalancerSpec = None,
        group_by: str | None = None,
        stratify: bool = False,
        **kwargs: Any,
    ) -> None:
        given = (kwargs.get("optimizers") or (None, None))[0]
        if given is not None:
            try:
                unwrap(given)
            except TypeError:
                raise TrainerSetupError(
                    f"optimizers=({type(given).__name__}, ...) is not a Balancer, so the trainer's steps would balance "
                    "nothing. Pass optimizers=(Balancer(opt, plugins=[...]), scheduler), or leave optimizers out and "
                    "give balancer=[...] (the trainer then wraps the optimizer it creates); "
                    "optimizer_cls_and_kwargs=(cls, kwargs) picks that optimizer."
                ) from None
            if balancer is not None:
                raise TrainerSetupError(
                    "Both optimizers=(Balancer, ...) and balancer= were given: the Balancer passed in already has "
                    "its plugins. Give one of them."
                )
        self._balancer_plugins, self._balancer_kwargs = resolve_spec(balancer)
        self.group_by = group_by
        self.stratify = stratify
        self._balancer_logged_step = -1
        self._balancer_optimizer_given = given is not None
        self._groups_this_step: list[str] = []  # captured by the earlier micro-batches of this optimizer step
        super().__init__(*args, **kwargs)
        self._check_balancer_setup()

    # -- what the trainer may do with a Balancer ------------------------------------------------
    def _check_balancer_setup(self) -> None:
        trainer: Any = self
        args = trainer.args
        if self._on_deepspeed:
            check_trainer_deepspeed(trainer, self._balancer_optimizer_given)
        if transformers.trainer.is_sagemaker_mp_enabled():
            raise TrainerSetupError("BalancedTrainer does not support SageMaker model parallelism.")
        if any(name in str(args.optim) for name in _FUSED_OPTIMIZERS):
            raise TrainerSetupError(
                f"optim='{args.optim}' updates the parameters inside the backward pass, so no step is left for the "
                "Balancer to weigh. Pick an optimizer that steps after backward (e.g. adamw_torch)."
            )
        overridden = (
            type(self).group_losses is not BalancerTrainerMixin.group_losses
            or type(self).balanced_backward is not BalancerTrainerMixin.balanced_backward
        )
        if self.group_by is None and not overridden:
            raise TrainerSetupError(
                "Give group_by='<column>' (the training-set column naming each example's group), or override "
                "group_losses(model, inputs, num_items_in_batch) to return {group: loss}."
            )
        if self.stratify and self.group_by is None:
            raise TrainerSetupError("stratify=True samples by the group_by column: give group_by='<column>'.")
        if self.stratify and args.train_sampling_strategy != "random":
            raise TrainerSetupError(
                f"stratify=True replaces the sampler, so train_sampling_strategy='{args.train_sampling_strategy}' "
                "would be ignored. Use one of them."
            )

    @property
    def _on_deepspeed(self) -> bool:
        return bool(getattr(self, "is_deepspeed_enabled", False))

    def _make_balancer(self, optimizer: Any) -> Balancer:
        """The Balancer the trainer steps, on what the trainer built: its torch optimizer, or under
        ``deepspeed=`` the DeepSpeed engine (whose own optimizer stays the plain one)."""
        if self._on_deepspeed:
            return engine_balancer(self, self._balancer_plugins, self._balancer_kwargs)
        return Balancer(optimizer, self._balancer_plugins, **self._balancer_kwargs)

    def create_optimizer(self, model: Any = None) -> Any:
        """``Trainer``'s optimizer (its ``optim``, weight-decay parameter groups), wrapped in a Balancer;
        under ``deepspeed=`` the plain optimizer, which DeepSpeed wraps (the Balancer comes after)."""
        trainer: Any = self
        if trainer.optimizer is None:
            inner = super().create_optimizer(model)  # type: ignore[misc]
            trainer.optimizer = inner if self._on_deepspeed else self._make_balancer(inner)
        return trainer.optimizer

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """Under ``deepspeed=``: ``Trainer``'s preparation, then the Balancer on the engine becomes the
        optimizer, then the checkpoint (if resuming) is loaded, so that it restores the Balancer too."""
        trainer: Any = self
        if not self._on_deepspeed:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)  # type: ignore[misc]
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)  # type: ignore[misc]
        trainer.optimizer = trainer.callback_handler.optimizer = self._make_balancer(trainer.model_wrapped)
        if resume_from_checkpoint is not None:
            load_checkpoint_after_prepare(trainer, resume_from_checkpoint)
        return model, train_dataloader

    @property
    def balancer(self) -> Balancer:
        """The Balancer the trainer steps (inside accelerate's wrapper once training started)."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            raise TrainerSetupError(
                "The trainer has no optimizer yet: it is created by train() (or create_optimizer())."
            )
        return unwrap(optimizer)

    # -- data: keep the group column, optionally stratify -----------------------------------------
    def get_train_dataloader(self) -> Any:
        trainer: Any = self
        column = self.group_by
        if column is None:
            return super().get_train_dataloader()  # type: ignore[misc]
        self._check_group_column(trainer.train_dataset)
        collator = trainer.data_collator
        trainer._set_signature_columns_if_needed()
        signature = trainer._signature_columns
        trainer.data_collator = GroupColumnCollator(collator, column)
        trainer._signature_columns = [*signature, column]  # so remove_unused_columns keeps it for training
        try:
            return super().get_train_dataloader()  # type: ignore[misc]
        finally:
            trainer.data_collator = collator
            trainer._signature_columns = signature

    def _check_group_column(self, dataset: Any) -> None:
        names = getattr(dataset, "column_names", None)
        if isinstance(names, list) and self.group_by not in names:
            raise TrainerSetupError(
                f"group_by='{self.group_by}' is not a column of the training set (columns: {names}). Add a column "
                "naming each example's group, or pass the right column name."
            )

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        trainer: Any = self
        if not self.stratify:
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        dataset = trainer.train_dataset if train_dataset is None else train_dataset
        column = str(self.group_by)
        if isinstance(getattr(dataset, "column_names", None), list):
            values = list(dataset[column])
        elif isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise TrainerSetupError("stratify=True needs a training set with a length (not an IterableDataset).")
        else:
            values = [dataset[i][column] for i in range(len(dataset))]
        args = trainer.args
        step = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        seed = args.data_seed if args.data_seed is not None else args.seed
        return StratifiedGroupSampler([group_name(v, column) for v in values], step, seed)

    # -- the training step: one backward per group --------------------------------------------
    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the loss is already normalised over the accumulated batch, by ``Trainer``'s own rule."""
        trainer: Any = self
        declared = getattr(trainer, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        return bool(trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )

    def group_losses(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> GroupLosses:
        """The loss of each group in this micro-batch, whose sum is the batch loss that
        ``Trainer.compute_loss`` would return: a mapping ``{group: loss}``, or ``(group, loss)`` pairs
        yielded one at a time. Override it to compute the groups another way.

        Pairs are taken one by one: each group's backward runs before the next group's forward, so
        only one group's graph is alive at a time, and under DDP every backward follows its own
        forward (DDP synchronises only the first backward after a forward: losses from forwards run
        beforehand are refused there by the Balancer's rank check). A mapping's losses may share one
        graph (``retain_graph`` is handled); use it where DDP is not involved.

        The default yields pairs: it splits the batch by the ``group_by`` column and runs
        ``compute_loss`` on each part. When the loss is normalised by ``num_items_in_batch`` (causal
        LMs in ``Trainer``), each part gets the same ``num_items_in_batch`` and the parts add up; when
        it is a mean over the part, each part's loss is weighted by its share of the label tokens
        (counted as ``Trainer`` counts them), or of the examples when the batch has no labels. A part
        with no label token adds nothing to a mean and is left out.

        With several ranks (DDP, FSDP, DeepSpeed), every rank runs the groups present on any rank, in
        one order (:func:`~balancer.integrations._hf_groups.ranks_group_order`); a group a rank has
        no example (or label token) of gets a zero loss there (a forward of another part, times 0).
        """
        return self._split_by_group(model, inputs, num_items_in_batch)

    def _split_by_group(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None
    ) -> Iterator[tuple[str, Tensor]]:
        """The default :meth:`group_losses`: one ``compute_loss`` per group part, yielded one at a time."""
        trainer: Any = self
        if GROUP_KEY not in inputs:
            raise GroupingError(
                "The batch carries no group names: set group_by='<column>' on the trainer, or override group_losses."
            )
        inputs = dict(inputs)
        names = list(inputs.pop(GROUP_KEY))
        parts = split_by_group(inputs, names)
        order = self.ranks_group_order(list(parts))

        def loss_of(part: dict[str, Any]) -> Tensor:
            return trainer.compute_loss(model, part, num_items_in_batch=num_items_in_batch)

        def absent() -> Tensor:  # this rank's share of a group it has nothing of: zero, through the model
            return loss_of(next(iter(parts.values()))) * 0.0

        if (num_items_in_batch is not None and self._loss_is_scaled_for_ga(num_items_in_batch)) or len(order) == 1:
            for name in order:
                yield name, loss_of(parts[name]) if name in parts else absent()
            return
        shifted = bool(getattr(trainer, "_loss_shifts_labels", False))
        total = label_count(inputs, shifted)
        for name in order:
            count = label_count(parts[name], shifted) if name in parts else 0
            if int(count) == 0:
                if several_ranks():
                    yield name, absent()
                continue
            yield name, loss_of(parts[name]) * (count / total)

    def ranks_group_order(self, present: list[str]) -> list[str]:
        """The groups this rank runs in this micro-batch: with several ranks, those present on any rank
        (:func:`~balancer.integrations._hf_groups.ranks_group_order`), including :meth:`groups_to_join`."""
        return ranks_group_order(present + [name for name in self.groups_to_join() if name not in present])

    def groups_to_join(self) -> list[str]:
        """In the micro-batch that synchronises the gradients, with several ranks: the groups an earlier
        micro-batch of this optimizer step captured on this rank. DDP reduces a group's gradient only
        in a synchronised backward of that group, so each of them runs here too, with a zero loss
        where this micro-batch has no row of it. Empty otherwise."""
        trainer: Any = self
        return list(self._groups_this_step) if several_ranks() and trainer.accelerator.sync_gradients else []

    def _note_captured(self, names: Iterable[str]) -> None:
        self._groups_this_step.extend(name for name in dict.fromkeys(names) if name not in self._groups_this_step)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """``Trainer.training_step`` with the backward of :meth:`balanced_backward` (by default one
        backward per group, each inside ``opt.group(name)``), inside the trainer's activation-offload
        context where it has one (TRL's trainers). Returns the summed scaled loss, for the logs."""
        trainer: Any = self
        offload = getattr(trainer, "maybe_activation_offload_context", None) or contextlib.nullcontext()
        cp_context, inputs = trainer._prepare_context_parallel_inputs(model, inputs)
        with cp_context(), offload:
            model.train()
            if callable(getattr(trainer.optimizer, "train", None)):
                trainer.optimizer.train()
            inputs = trainer._prepare_inputs(inputs)
            loss = self.balanced_backward(model, inputs, num_items_in_batch)
        if trainer.accelerator.sync_gradients:
            self._groups_this_step = []
        return loss

    def scale_like_trainer(self, loss: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
        """``loss`` scaled as ``Trainer.training_step`` scales its one loss before backward: the mean
        over ``DataParallel`` replicas for ``n_gpu > 1``, divided by the accumulation steps unless the
        loss is already normalised by ``num_items_in_batch``."""
        trainer: Any = self
        if trainer.args.n_gpu > 1:
            loss = loss.mean()  # as Trainer averages DataParallel replicas
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / trainer.current_gradient_accumulation_steps
        return loss

    def backward_rows(self, loss: Tensor, *, at: Tensor, group: list[str]) -> None:
        """``opt.backward_rows`` on a loss scaled like ``Trainer.training_step``'s (see
        :meth:`scale_like_trainer`), with what ``accelerator.backward`` adds: its own division by
        accelerate's accumulation steps and the fp16 loss scale."""
        trainer: Any = self
        accelerator = trainer.accelerator
        loss = loss / accelerator.gradient_accumulation_steps
        if accelerator.scaler is not None:
            loss = accelerator.scaler.scale(loss)
        self.balancer.backward_rows(loss, at=at, group=group)
        self._note_captured(group)

    def balanced_backward(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The micro-batch's forward and grouped backward; returns the scaled loss, detached, for the logs.

        The default runs :meth:`group_losses` and one backward per group inside ``opt.group(name)``,
        each loss scaled as ``Trainer`` scales its one loss (:meth:`scale_like_trainer`), so their
        gradients add up to ``Trainer``'s. Trainers whose groups are rows of one forward pass (DPO's
        chosen and rejected, GRPO's tasks) override it with :meth:`backward_rows`.
        """
        trainer: Any = self
        with trainer.compute_loss_context_manager():  # a mapping's forwards run here; pairs run one by one below
            losses = self.group_losses(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if isinstance(losses, Mapping):
            last = list(losses)[-1] if losses else None  # the losses may share a graph: keep it until then
            pairs: Iterable[tuple[str, Tensor]] = list(losses.items())
        else:
            last, pairs = None, _each_in_context(losses, trainer.compute_loss_context_manager)
        opt = self.balancer
        total: Tensor | None = None
        for name, loss in pairs:
            loss = self.scale_like_trainer(loss, num_items_in_batch)
            with opt.group(str(name)):
                trainer.accelerator.backward(loss, retain_graph=True if last is not None and name != last else None)
            self._note_captured([str(name)])
            total = loss.detach() if total is None else total + loss.detach()
        if total is None:
            raise GroupingError("group_losses returned no loss for this batch; return {group: loss} or yield pairs.")
        return total

    # -- clipping and the logged norm: the balanced update's ------------------------------------
    def _framework_clips(self) -> bool:
        """DeepSpeed's ``gradient_clipping`` clips in ``engine.step()``: the norm is known after the step."""
        return self._on_deepspeed and self.balancer.backend.framework_clipping() is not None

    def _clip_grad_norm(self, model: torch.nn.Module) -> Tensor | None:
        trainer: Any = self
        if self._framework_clips():
            return None  # DeepSpeed clips the balanced update itself; logged from last_stats after the step
        return self.balancer.clip_grad_norm_(trainer.args.max_grad_norm, scaler=trainer.accelerator.scaler)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        trainer: Any = self
        if grad_norm is None and not self._framework_clips():
            # measured, not clipped: an infinite max_norm leaves the update as it is
            grad_norm = self.balancer.clip_grad_norm_(float("inf"), scaler=trainer.accelerator.scaler)
        return grad_norm

    def _maybe_log_save_evaluate(self, tr_loss: Tensor, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        if grad_norm is None and self._framework_clips():
            stats = self.balancer.last_stats  # the step measured DeepSpeed's clip of the balanced update
            grad_norm = None if stats is None else stats.grad_norm
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)  # type: ignore[misc]

    # -- logs -------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the Balancer's per-group norms, weights and plugin metrics to each training log."""
        trainer: Any = self
        step = trainer.state.global_step
        optimizer = getattr(trainer, "optimizer", None)
        if "loss" in logs and optimizer is not None and step != self._balancer_logged_step:
            logs = {**logs, **balancer_logs(unwrap(optimizer))}
            self._balancer_logged_step = step
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class BalancedTrainer(BalancerTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose optimizer is a Balancer; see :class:`BalancerTrainerMixin`.

    Usage (``model`` and ``dataset`` are yours; the dataset has a ``task`` column)::

        trainer = BalancedTrainer(
            model=model,
            args=TrainingArguments(output_dir="out", max_grad_norm=1.0),
            train_dataset=dataset,  # with a "task" column
            balancer=["task_norm"],
            group_by="task",
        )
        trainer.train()
    """
