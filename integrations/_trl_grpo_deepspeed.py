"""``BalancedGRPOTrainer`` under DeepSpeed: one forward per task.

DeepSpeed reduces gradients at every backward pass and takes one backward per forward, so the
completions of one forward cannot be sent down task by task (``opt.backward_rows``). Instead TRL's
loss runs on a forward without gradient (its metrics as usual), whose gradient at the per-token
log-probabilities and entropies gives the coefficients (:func:`._trl_grpo_split.leaf_gradients`);
then each task's completions run forward again and backward ``Σ G·log π`` inside the task's group,
and the ungrouped terms (KL, entropy bonus), if any, run one more forward of all completions outside
any group. Every rank captures the tasks present on any rank, in sorted order; a rank with no
completion of a task runs one of its completions with coefficient 0, so that the collectives match.

Exact when a forward is deterministic (no dropout) and completions are independent (no MoE auxiliary
loss over the batch's routing, text only): :func:`check_deepspeed_setup` refuses the rest. Cost per
micro-batch: one forward without gradient, then a forward and backward per task (and one for the
ungrouped terms): about twice a plain step's compute with one task, more with several.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._hf_groups import GroupingError, TrainerSetupError
from ._trl_grpo_split import ModelOutputsAsLeaves, leaf_gradients, names_on_all_ranks, without_kl

__all__ = ["backward_per_task", "check_deepspeed_setup"]

# Inputs of vision-language models, which TRL slices per image or tile: not sliced by task here.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "image_sizes")


def check_deepspeed_setup(trainer: Any) -> None:
    """Under DeepSpeed each task runs its own forward (:func:`backward_per_task`), which must reproduce the
    first one: refuses dropout and a MoE auxiliary loss."""
    model = trainer.accelerator.unwrap_model(trainer.model) if trainer.model is not None else None
    active = [] if model is None else _active_dropout(model)
    if active:
        raise TrainerSetupError(
            f"BalancedGRPOTrainer under DeepSpeed recomputes each task's forward, which must equal the first one, but "
            f"the model has dropout ({', '.join(active[:3])}). Set disable_dropout=True and the model config's "
            "dropout probabilities to 0, or train without deepspeed= (DDP splits the loss on one forward)."
        )
    if trainer.aux_loss_enabled:
        raise TrainerSetupError(
            "A MoE auxiliary loss under DeepSpeed: it depends on the routing of the whole batch, which the per-task "
            "forwards do not reproduce. Set router_aux_loss_coef=0.0 or output_router_logits=False, or train "
            "without deepspeed= (DDP splits it exactly)."
        )


def _active_dropout(model: torch.nn.Module) -> list[str]:
    """The dropout modules and config dropout probabilities (attention dropout is functional) above 0."""
    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    found += [
        f"config.{key}={value}"
        for key, value in settings.items()
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0
    ]
    return found


def backward_per_task(
    trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None,
    names: list[str],
) -> Tensor:  # fmt: skip
    """The split by task (``names``: each completion's group) with one forward per task (module docs); returns
    the scaled loss."""
    present = [key for key in _MULTIMODAL_KEYS if inputs.get(key) is not None]
    if present:
        raise GroupingError(
            f"BalancedGRPOTrainer under DeepSpeed runs text-only batches; this one has {present}. Train a "
            "vision-language model without deepspeed=."
        )
    stand_in = ModelOutputsAsLeaves(model, grad=False)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(stand_in, inputs, num_items_in_batch)
        loss = trainer.scale_like_trainer(loss, num_items_in_batch)
        policy_loss = None
        if trainer.beta != 0.0:  # the same loss on the same outputs, without the KL term
            stand_in.replay()
            with without_kl(trainer):
                policy_loss = trainer.compute_loss(stand_in, inputs, num_items_in_batch)
            policy_loss = trainer.scale_like_trainer(policy_loss, num_items_in_batch)
    if len(stand_in.outputs) != 1:
        raise GroupingError(f"compute_loss ran the model {len(stand_in.outputs)} times on one micro-batch; expected 1.")
    policy, rest = leaf_gradients(loss, policy_loss, stand_in.pairs)
    width = inputs["completion_ids"].shape[1]  # TRL scores the last `width` positions
    policy = policy[:, -width:]
    kl, entropy = (None if g is None else g[:, -width:] for g in (rest["log_probs"][0], rest.get("entropy", [None])[0]))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    opt = trainer.balancer

    def forward(rows: Tensor, entropies: bool) -> tuple[Tensor, Tensor | None]:
        with trainer.compute_loss_context_manager():
            logp, ent, _ = trainer._get_per_token_logps_and_entropies(
                model, ids.index_select(0, rows), mask.index_select(0, rows), width, compute_entropy=entropies
            )
        return logp, ent

    everywhere = sorted(names_on_all_ranks(names)) if dist.is_initialized() else sorted(set(names))
    for name in everywhere:
        chosen = [i for i, n in enumerate(names) if n == name]
        rows = torch.tensor(chosen or [0], device=ids.device)
        coefficient = policy.index_select(0, rows) * (1.0 if chosen else 0.0)  # 0: this rank lacks the task
        logp, _ = forward(rows, entropies=False)
        with opt.group(name):
            trainer.accelerator.backward((coefficient * logp).sum())
    if _ungrouped_anywhere(kl is not None or entropy is not None, ids.device):
        logp, ent = forward(torch.arange(ids.shape[0], device=ids.device), entropies=entropy is not None)
        term = (kl * logp).sum() if kl is not None else (logp * 0.0).sum()
        if entropy is not None and ent is not None:
            term = term + (entropy * ent).sum()
        trainer.accelerator.backward(term)
    return loss.detach()


def _ungrouped_anywhere(here: bool, device: torch.device) -> bool:
    """Whether any rank has ungrouped terms this micro-batch: then every rank runs the ungrouped pass (with
    zeros where it has none), so that DeepSpeed's gradient reductions match."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return here
    flag = torch.tensor([1.0 if here else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
