"""``BalancedDPOTrainer`` under DeepSpeed: one forward per side.

DeepSpeed reduces gradients at every backward pass and takes one backward per forward, so the rows
of one forward cannot be sent down in two passes (``opt.backward_rows``). Instead TRL's loss runs
on a forward without gradient (its metrics and the reference log-probs as usual), which gives the
coefficients ``G`` of the per-token log-probs; then the chosen rows and the rejected rows each run
forward again and backward ``Σ G·x`` inside their group, and the ``"sft"`` term, if any, runs a
third forward of the chosen rows outside any group. Exact when a forward is deterministic (dropout
off) and rows are independent (no MoE auxiliary loss over the batch's routing):
:func:`check_deepspeed_setup` refuses the rest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._hf_groups import GroupingError, TrainerSetupError
from ._trl_dpo_parts import CHOSEN, REJECTED, PolicyForward, chosen_nll

__all__ = ["backward_per_side", "check_deepspeed_setup"]

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})  # batch keys TRL keeps


def check_deepspeed_setup(trainer: Any) -> None:
    """Under DeepSpeed each side runs its own forward (see :func:`backward_per_side`); refuses what
    that cannot reproduce."""
    if not trainer.args.disable_dropout:
        raise TrainerSetupError(
            "BalancedDPOTrainer under DeepSpeed recomputes each side's forward, which must equal the first "
            "one: disable_dropout=False would draw new dropout masks. Set disable_dropout=True (TRL's default)."
        )
    if trainer.aux_loss_enabled:
        raise TrainerSetupError(
            f"router_aux_loss_coef={trainer.router_aux_loss_coef} under DeepSpeed: the MoE auxiliary loss "
            "depends on the routing of the whole batch, which the per-side forwards do not reproduce. Set "
            "router_aux_loss_coef=0.0, or train without deepspeed= (DDP splits it exactly)."
        )


def backward_per_side(
    trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None
) -> Tensor:
    """The chosen/rejected split with one forward per side (see the module docs); returns the scaled loss."""
    opt = trainer.balancer
    policy = PolicyForward(model, grad=False)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(policy, inputs)
    if policy.leaf is None:
        raise GroupingError("BalancedDPOTrainer: the DPO loss did not run the policy model.")
    leaf = policy.leaf
    loss = trainer.scale_like_trainer(loss, num_items_in_batch)
    shift_mask = inputs["completion_mask"][..., 1:]
    sft = trainer._sft_term(leaf, shift_mask)
    preference = loss if sft is None else loss - trainer.scale_like_trainer(sft, num_items_in_batch)
    (grad,) = torch.autograd.grad(preference, leaf)
    pairs = leaf.shape[0] // 2
    for name, rows in ((CHOSEN, slice(0, pairs)), (REJECTED, slice(pairs, 2 * pairs))):
        with trainer.compute_loss_context_manager():
            x = _side_log_probs(model, inputs, rows)
        with opt.group(name):
            trainer.accelerator.backward((grad[rows] * x).sum())
    if sft is not None:
        with trainer.compute_loss_context_manager():
            x = _side_log_probs(model, inputs, slice(0, pairs))
        chosen_sft = trainer._sft_weight() * chosen_nll(x, shift_mask[:pairs])
        trainer.accelerator.backward(trainer.scale_like_trainer(chosen_sft, num_items_in_batch))
    return loss.detach()


def _side_log_probs(model: torch.nn.Module, inputs: dict[str, Any], rows: slice) -> Tensor:
    """The policy's per-token log-probs of some rows of the batch, called as TRL's loss calls the model."""
    kwargs = {k: v[rows] for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    labels = inputs["input_ids"][rows].masked_fill(inputs["completion_mask"][rows] == 0, -100)
    return model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
