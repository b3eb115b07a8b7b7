"""``BalancedGRPOTrainer``: TRL's ``GRPOTrainer`` whose policy-gradient update is balanced across tasks.

Each prompt of the training set names its task in a column (``group_by="task"``); every completion
of the prompt belongs to that task. The groups of the Balancer are the tasks, and their gradients
are the exact split of GRPO's loss by completion, from one forward pass: the policy term of each
task's completions is that task's group gradient; the KL, entropy-bonus and MoE auxiliary-loss
terms are ungrouped (weight 1). How the loss is split: :mod:`._trl_grpo_split`.

This module holds the trainer itself: its checks and refusals at construction, the task of each
completion (attached at generation), and the backward pass of each micro-batch. The per-task
metrics (``task_stats=True`` included) are in :mod:`._trl_grpo_stats`, the task names and the
``stratify=True`` sampler in :mod:`._trl_grpo_sampler`.

Cost per micro-batch: the forward once, then one backward pass per task present (below the
log-probabilities), plus one full pass for the ungrouped terms when there are any. Under DDP every
rank captures the tasks present on any rank (a task a rank lacks costs it one pass of zeros). Under
DeepSpeed, which allows one backward per forward, each task runs a forward of its own
(:mod:`._trl_grpo_deepspeed`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from balancer._unwrap import unwrap
from balancer.recipes.split_half import SplitHalf

from ._hf_groups import GroupingError, TrainerSetupError, group_name
from ._trl_grpo_deepspeed import backward_per_task, check_deepspeed_setup
from ._trl_grpo_sampler import StratifiedRepeatSampler, stratified_repeat_sampler, task_vocabulary
from ._trl_grpo_split import (
    ModelOutputsAsLeaves,
    agree_on_groups,
    embedding_leaf_detached,
    names_on_all_ranks,
    split_gradient,
    without_kl,
)
from ._trl_grpo_stats import HALF_KEY, TaskMetrics, row_groups, total_rewards
from .transformers import BalancerTrainerMixin

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("balancer.integrations.trl needs TRL: pip install 'gradient-balancer[trl]'") from exc

__all__ = ["TASK_KEY", "BalancedGRPOTrainer", "StratifiedRepeatSampler"]

TASK_KEY = "balancer_task"  # LongTensor [rows]: each completion's index into the trainer's task names
TASK_METRICS_FILE = "balancer_task_metrics.json"  # in each checkpoint with task_stats=True


class BalancedGRPOTrainer(BalancerTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` whose optimizer is a Balancer over the tasks of a dataset column.

    Args:
        balancer: the plugins (a list) or a config, as for
            :class:`~balancer.integrations.transformers.BalancerTrainerMixin`.
        group_by: the training-set column naming each prompt's task (strings or integers). Required.
        stratify: sample prompts so that every generation batch (every optimizer step, with TRL's
            default ``steps_per_generation``) holds every task with prompts left in the epoch.
        task_stats: split each task's completions by prompt into halves ``task/A``, ``task/B`` and log
            per task the squared gradient norm, its unbiased split-half estimate and the learning gain
            (:mod:`._trl_grpo_stats`). Needs ``num_iterations=1`` and ``steps_per_generation ==
            gradient_accumulation_steps`` (TRL's defaults).

    Logs, besides the mixin's ``balancer/norm/<group>``, ``balancer/weight/<group>`` and plugin metrics,
    averaged over the logging window by TRL: ``balancer/reward/<task>``, ``balancer/advantage/<task>``,
    ``balancer/abs_advantage/<task>``, ``balancer/completions/<task>``; with ``task_stats=True``
    also ``balancer/sq_norm/<task>``, ``balancer/split_half_sq_norm/<task>``, ``balancer/sq_norm_ratio``
    and ``balancer/learning_gain/<task>``. Other arguments are ``GRPOTrainer``'s.

    Usage::

        trainer = BalancedGRPOTrainer(
            model=model, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=dataset,
            balancer=["task_norm"], group_by="task",
        )
        trainer.train()
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: Any = None,
        train_dataset: Any = None,
        *rest: Any,
        balancer: Any = None,
        group_by: str | None = None,
        stratify: bool = False,
        task_stats: bool = False,
        **kwargs: Any,
    ) -> None:
        if group_by is None:
            raise TrainerSetupError(
                "BalancedGRPOTrainer needs group_by='<column>': the training-set column naming each prompt's task."
            )
        self.task_stats = task_stats
        self._task_names = task_vocabulary(train_dataset, group_by)
        self._vocabulary_complete = bool(self._task_names)
        if args is not None:
            _check_grpo_args(args, task_stats)
        self._rewards_per_func: Tensor | None = None  # TRL's rewards of the last generation batch
        self._task_metrics = TaskMetrics(split_half=task_stats)
        super().__init__(
            model, reward_funcs, args, train_dataset, *rest, balancer=balancer, group_by=group_by,
            stratify=stratify, **kwargs,
        )  # fmt: skip
        self._check_grpo_trainer()

    # -- setup ------------------------------------------------------------------------------------
    def _check_grpo_trainer(self) -> None:
        trainer: Any = self
        if trainer.is_fsdp_enabled:
            raise TrainerSetupError(
                "BalancedGRPOTrainer splits the loss by task with opt.backward_rows (one process, DDP) or one forward "
                "per task (DeepSpeed), not under FSDP. Train without fsdp=."
            )
        if self._on_deepspeed:
            check_deepspeed_setup(trainer)
        plugins = list(self._balancer_plugins)
        if self._balancer_optimizer_given:
            plugins = list(unwrap(self.optimizer).plugins)
            if self.task_stats and not all(isinstance(p, SplitHalf) for p in plugins):
                raise TrainerSetupError(
                    "task_stats=True captures each task as two halves: the Balancer passed in optimizers= must wrap "
                    "its plugins in balancer.recipes.split_half.SplitHalf([...]) so they weigh tasks, not halves."
                )
        inner = [q for p in plugins for q in (p.inner if isinstance(p, SplitHalf) else (p,))]
        needs_losses = [p.name for p in inner if getattr(p, "needs_losses", False)]
        if needs_losses:
            raise TrainerSetupError(
                f"Plugins {needs_losses} weigh the groups by their loss values, which the exact split of GRPO's loss "
                "(opt.backward_rows) does not record. Use a gradient-based plugin (task_norm, an aggregator)."
            )
        if self.task_stats:
            clash = [t for t in self._task_names if t.rpartition("/")[2] in ("A", "B")]
            if clash:
                raise TrainerSetupError(
                    f"task_stats=True names the halves of task t `t/A` and `t/B`; the tasks {clash} end like a half. "
                    "Rename them."
                )
            if not self._balancer_optimizer_given:
                self._balancer_plugins = [SplitHalf(self._balancer_plugins)]

    @property
    def _generations(self) -> int:
        """Completions per prompt in training (``num_generations``)."""
        trainer: Any = self
        return int(trainer.num_generations)

    def _set_signature_columns_if_needed(self) -> None:
        trainer: Any = self
        super()._set_signature_columns_if_needed()
        if self.group_by not in trainer._signature_columns:  # kept by remove_unused_columns=True
            trainer._signature_columns = [*trainer._signature_columns, self.group_by]

    def get_train_dataloader(self) -> Any:
        """GRPO's dataloader (its identity collator keeps the task column in every example)."""
        self._check_group_column(self.train_dataset)
        return GRPOTrainer.get_train_dataloader(self)

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        dataset = self.train_dataset if dataset is None else dataset
        if not self.stratify:
            return GRPOTrainer._get_train_sampler(self, dataset)
        return stratified_repeat_sampler(dataset, str(self.group_by), self.args, self._generations, self.num_iterations)

    # -- generation: each completion's task, per-task scores ---------------------------------------
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Tensor:
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards  # gathered over the processes: [all completions, reward functions]
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        column = str(self.group_by)
        missing = [i for i, x in enumerate(inputs) if column not in x]
        if missing:
            raise GroupingError(
                f"group_by='{column}': example {missing[0]} of the generation batch has no `{column}` field (found "
                f"{sorted(inputs[missing[0]])}). Add the column naming each prompt's task to the training set."
            )
        names = [group_name(x[column], column) for x in inputs]
        self._extend_vocabulary(names)
        output = super()._generate_and_score_completions(inputs)
        index = {name: i for i, name in enumerate(self._task_names)}
        local = torch.tensor([index[n] for n in names], dtype=torch.long)  # on the CPU: no device sync later
        output[TASK_KEY] = local
        mode = "train" if self.model is not None and self.model.training else "eval"
        tasks = self.accelerator.gather(local.to(self.accelerator.device)).cpu()
        self._log_task_scores(mode, tasks, output["advantages"])
        if self.task_stats and mode == "train":
            rank = self.accelerator.process_index
            halves = self._task_metrics.split_halves(self._task_names, tasks, self._generations)
            output[HALF_KEY] = halves[rank * len(names) : (rank + 1) * len(names)]
        return output

    def _extend_vocabulary(self, names: list[str]) -> None:
        """Tasks unseen at construction (an IterableDataset) are added in sorted order, the same on every rank."""
        if self._vocabulary_complete:
            unknown = sorted(set(names) - set(self._task_names))
            if unknown:
                raise GroupingError(f"Tasks {unknown} are not in the training set's `{self.group_by}` column.")
            return
        seen = names_on_all_ranks(names) if self.accelerator.num_processes > 1 else set(names)
        self._task_names.extend(sorted(seen - set(self._task_names)))

    def _log_task_scores(self, mode: str, tasks: Tensor, advantages: Tensor) -> None:
        """The per-task scores of a generation batch (:meth:`TaskMetrics.log_scores`), from values gathered over
        the processes: every rank logs the same."""
        advantages = self.accelerator.gather(advantages.detach().reshape(advantages.shape[0], -1).mean(dim=1)).cpu()
        rewards = total_rewards(self._rewards_per_func, self.reward_weights, tasks.shape[0])
        metrics = self._metrics[mode]
        self._task_metrics.log_scores(metrics, self._task_names, tasks, rewards, advantages, train=mode == "train")

    # -- the step ---------------------------------------------------------------------------------
    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The mixin's step, with GRPO's bookkeeping around it: ``_step`` (which decides when to generate) and
        the ``step_time`` metric."""
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._current_train_step_time += time.perf_counter() - started
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss

    def balanced_backward(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """GRPO's loss on one forward pass, split exactly by task at the log-probabilities (module docstring)."""
        inputs = dict(inputs)
        tasks = inputs.pop(TASK_KEY, None)
        halves = inputs.pop(HALF_KEY, None)
        if tasks is None:
            raise GroupingError(
                "The batch carries no task indices: it did not come from _generate_and_score_completions."
            )
        names = row_groups(self._task_names, tasks, halves)
        if self._on_deepspeed:
            return backward_per_task(self, model, inputs, num_items_in_batch, names)
        stand_in = ModelOutputsAsLeaves(model)
        with self.compute_loss_context_manager(), embedding_leaf_detached(self.model):
            loss = self.scale_like_trainer(self.compute_loss(stand_in, inputs, num_items_in_batch), num_items_in_batch)
            policy_loss = None
            if self.beta != 0.0:  # the same loss on the same outputs, without the KL term: no second forward
                stand_in.replay()
                with without_kl(self):
                    policy_loss = self.compute_loss(stand_in, inputs, num_items_in_batch)
                policy_loss = self.scale_like_trainer(policy_loss, num_items_in_batch)
        del inputs
        at, policy, ungrouped = split_gradient(loss, policy_loss, stand_in.pairs)
        if self.accelerator.num_processes > 1:
            at, policy, names = agree_on_groups(at, policy, names, also=self.groups_to_join())
        surrogate = (policy * at).sum()
        self.backward_rows(surrogate if ungrouped is None else surrogate + ungrouped, at=at, group=names)
        return loss.detach()

    # -- per-step task statistics -----------------------------------------------------------------
    def _save_rng_state(self, output_dir: str) -> None:
        """Trainer saves its random states with every resumable checkpoint; the learning gain's state goes
        with them (the same on every rank: it comes from gathered rewards)."""
        super()._save_rng_state(output_dir)
        if self.task_stats and self.args.should_save:
            (Path(output_dir) / TASK_METRICS_FILE).write_text(json.dumps(self._task_metrics.state_dict()))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = None if checkpoint is None else Path(checkpoint) / TASK_METRICS_FILE
        if self.task_stats and path is not None and path.is_file():
            self._task_metrics.load_state_dict(json.loads(path.read_text()))

    def _maybe_log_save_evaluate(self, tr_loss: Tensor, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        if self.task_stats:  # the step's per-task norms, before TRL averages and logs the window's metrics
            step = self.state.global_step
            self._task_metrics.record(step, self._metrics["train"], self._task_names, self.balancer.last_stats)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)


def _check_grpo_args(args: Any, task_stats: bool) -> None:
    """Refuses, before TRL builds anything, the settings whose loss cannot be split exactly by task."""
    if getattr(args, "use_vllm", False):
        raise TrainerSetupError(
            "BalancedGRPOTrainer does not support use_vllm=True yet (generation and weight sync through vLLM are "
            "not verified with the grouped backward). Generate with transformers (use_vllm=False)."
        )
    if getattr(args, "fsdp", None):
        raise TrainerSetupError(
            "BalancedGRPOTrainer splits the loss by task with opt.backward_rows (one process, DDP) or one forward per "
            "task (DeepSpeed), not under FSDP. Train without fsdp=."
        )
    checkpoint = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if getattr(args, "gradient_checkpointing", False) and checkpoint.get("use_reentrant"):
        raise TrainerSetupError(
            "gradient_checkpointing_kwargs={'use_reentrant': True}: reentrant checkpointing cannot run the partial "
            "backward passes of the split by task. Use {'use_reentrant': False} (TRL's default)."
        )
    if task_stats and args.steps_per_generation != args.gradient_accumulation_steps:
        raise TrainerSetupError(
            f"task_stats=True needs each optimizer step to hold exactly one generation batch, so that the halves of a "
            f"task are the whole step's prompts: steps_per_generation={args.steps_per_generation} must equal "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}."
        )
    iterations = getattr(args, "num_iterations", 1)
    if task_stats and iterations != 1:
        raise TrainerSetupError(
            f"task_stats=True needs num_iterations=1, not num_iterations={iterations}: from the second iteration on, "
            "the policy has already been updated on both halves of each task, so the halves' gradients are no longer "
            "independent and the split-half estimate of the squared norm of the mean gradient is biased. Set "
            "num_iterations=1 to measure, or task_stats=False."
        )
