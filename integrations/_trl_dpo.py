"""``BalancedDPOTrainer``: TRL's ``DPOTrainer`` with the chosen/rejected split of the DPO gradient.

Groups ``"chosen"`` and ``"rejected"`` are the rows of TRL's concatenated batch (chosen first,
then rejected). Each micro-batch runs TRL's own loss once, with one change: the policy forward's
per-token log-probabilities reach the loss as a detached copy ``lp`` (a leaf), while the model's
real ones, ``x``, are kept. Then, for the loss ``L`` scaled as ``Trainer`` scales it:

1. ``G = d(L − L_sft)/d lp``, one backward pass through the loss arithmetic only (no model),
   is the preference loss's gradient at the log-probs; ``L_sft`` is the ``"sft"`` term of
   ``loss_type`` lists (TRL's NLL of the chosen completions), written out here and evaluated on ``lp``.
2. ``opt.backward_rows(S, at=x', group=...)`` with ``x' = x.view_as(x)`` and
   ``S = Σ G·x' + L_sft(x) + c·aux``: the preference part flows through ``x'`` and is split
   exactly by rows; the ``"sft"`` term (through ``x``) and a MoE model's auxiliary loss (``aux``,
   weighted by ``router_aux_loss_coef`` as TRL does) avoid ``x'`` and are ungrouped.

So the update is TRL's gradient (to rounding) split into ``chosen + rejected + ungrouped``. Cost:
one backward pass below the log-probs per group (two) plus, with an ungrouped term, one more.
When every plugin acts only at taps (``balanced_dpo`` with ``rule="prob"``) no group is needed:
``S`` is backpropagated once, through the taps, like TRL's own loss (``split_groups`` forces the
split, to log the two sides' norms).

Taps (``balanced_dpo`` with ``rule="prob"``, or any tap plugin): the preference loss depends on
each row's log-probs through their sum (or, for ``"ipo"``/``"sigmoid_norm"``, their token mean),
so ``G`` is constant along each row: the sequence log-prob ``s`` is built from ``x'``, tapped with
:func:`~balancer.recipes.dpo.tap_pairs` (rows labelled by pair) and ``Σ G·x'`` becomes
``Σ g·s`` with ``g`` the per-row value of ``G`` (times the token count for a mean). Refused
where that does not hold: ``ld_alpha`` (a weighted sum), sum-style and mean-style loss types
mixed, or a ``G`` that is not constant along its row (a subclass's per-token loss).

Under DeepSpeed, which reduces gradients at each backward pass and allows one backward per
forward, each side runs a forward of its own (:mod:`._trl_dpo_deepspeed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from balancer.contract.plugin import Plugin, TapPlugin
from balancer.recipes.dpo import tap_pairs

from ._hf_groups import GroupingError, TrainerSetupError
from ._hf_setup import BalancerSpec
from ._trl_dpo_deepspeed import backward_per_side, check_deepspeed_setup
from ._trl_dpo_parts import CHOSEN, REJECTED, PolicyForward, chosen_nll
from .transformers import BalancerTrainerMixin

try:
    from trl import DPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("BalancedDPOTrainer needs TRL: pip install 'gradient-balancer[trl]'") from exc

__all__ = ["BalancedDPOTrainer"]

# Loss types whose per-pair loss depends on each side's log-probs through their token mean
# (TRL divides the summed log-ratio by the completion length); every other one uses the sum.
_MEAN_STYLE = frozenset({"ipo", "sigmoid_norm"})
_SUM_STYLE = frozenset(
    {
        "sigmoid",
        "hinge",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
    }
)
_UNGROUPED = frozenset({"sft"})  # not part of the preference loss: added with weight 1


class _Plan(NamedTuple):
    split: bool  # capture chosen and rejected as groups (else one backward pass, taps only)
    reduction: str | None  # the tapped sequence log-prob: "sum", "mean", or None (no taps)


class BalancedDPOTrainer(BalancerTrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` whose optimizer is a Balancer, with groups ``"chosen"`` and ``"rejected"``.

    Args:
        balancer: the plugins or a config, as :class:`~balancer.integrations.transformers.BalancerTrainerMixin`
            takes them, e.g. ``["balanced_dpo"]`` (rule ``"norm"``) or
            ``[("balanced_dpo", {"rule": "prob"})]``; ``None``: no plugin (TRL's update, split and logged).
        split_groups: capture chosen and rejected as groups. Default: when a plugin acts on groups or
            there is no plugin (to measure them); with only tap rules (``rule="prob"``) the update is one
            backward pass through the taps, as cheap as TRL's, and the group norms are not measured:
            ``True`` measures and logs them anyway (two more backward passes below the log-probs).

    Other arguments are ``DPOTrainer``'s. Every ``loss_type`` TRL offers works; ``"sft"`` in a
    list is ungrouped, as is a MoE model's auxiliary loss. The logs add ``balancer/norm/chosen``,
    ``balancer/norm/rejected``, the weights and the plugins' metrics (``balanced_dpo``: tapped
    log-probs, the prob rule's factor) to TRL's own. How the split is made: :mod:`._trl_dpo`.

    Usage (``model``, ``ref_model``, ``tokenizer`` and ``pairs`` are yours)::

        trainer = BalancedDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=DPOConfig(output_dir="out", beta=0.1, max_grad_norm=1.0),
            train_dataset=pairs,  # prompt / chosen / rejected
            processing_class=tokenizer,
            balancer=[("balanced_dpo", {"rule": "prob"})],
        )
        trainer.train()
    """

    def __init__(
        self, *args: Any, balancer: BalancerSpec = None, split_groups: bool | None = None, **kwargs: Any
    ) -> None:
        given = [name for name in ("group_by", "stratify") if name in kwargs]
        if given:
            raise TrainerSetupError(
                f"BalancedDPOTrainer does not take {given}: its groups are the chosen and rejected completions of "
                "every pair. For groups of examples (tasks), use BalancedSFTTrainer or BalancedGRPOTrainer."
            )
        self.split_groups = split_groups
        self._plan: tuple[int, _Plan] | None = None
        super().__init__(*args, balancer=balancer, **kwargs)
        self._check_dpo_setup()
        if not self._balancer_optimizer_given:  # refuse bad plugin settings now, not at the first step
            self._make_plan(self._balancer_plugins)

    # -- what can be split ---------------------------------------------------------------------
    def _check_dpo_setup(self) -> None:
        trainer: Any = self
        if self._on_deepspeed:
            check_deepspeed_setup(trainer)
        types = list(trainer.loss_types)
        unknown = [t for t in types if t not in _SUM_STYLE | _MEAN_STYLE | _UNGROUPED]
        if unknown:
            raise TrainerSetupError(
                f"BalancedDPOTrainer cannot split loss_type {unknown}: it knows {sorted(_SUM_STYLE | _MEAN_STYLE)} "
                "(preference terms, split into chosen and rejected) and 'sft' (ungrouped)."
            )
        if not set(types) - _UNGROUPED:
            raise TrainerSetupError(
                f"loss_type={types} has no preference term, so there is no chosen/rejected gradient to balance. "
                "Add one (e.g. 'sigmoid'), or train the chosen completions with BalancedSFTTrainer."
            )
        if "sft" in types and trainer.use_weighting:
            raise TrainerSetupError(
                "loss_type with 'sft' and use_weighting=True: TRL weights the SFT term per pair, which the ungrouped "
                "SFT term of BalancedDPOTrainer does not reproduce. Set use_weighting=False or drop 'sft'."
            )

    def _make_plan(self, plugins: Sequence[Plugin]) -> _Plan:
        """Whether to split into groups and how to build the tapped sequence log-probs, for these plugins."""
        for plugin in plugins:
            options = getattr(plugin, "options", None)
            sides = (getattr(options, "chosen", CHOSEN), getattr(options, "rejected", REJECTED))
            if plugin.name == "balanced_dpo" and sides != (CHOSEN, REJECTED):
                raise TrainerSetupError(
                    f"balanced_dpo is configured for groups {sides}, but BalancedDPOTrainer names them "
                    f"({CHOSEN!r}, {REJECTED!r}). Remove the chosen=/rejected= options."
                )
        on_groups = not plugins or any(p.acts_on_groups for p in plugins)  # no plugin: measure the groups
        if self.split_groups is False and on_groups:
            names = [p.name for p in plugins if p.acts_on_groups] or ["no plugin: the measured groups"]
            raise TrainerSetupError(
                f"split_groups=False, but {names} act on the chosen/rejected groups, which then would not exist. "
                "Leave split_groups unset."
            )
        split = on_groups if self.split_groups is None else self.split_groups
        taps = [p.name for p in plugins if isinstance(p, TapPlugin) and p.needs_taps]
        if self._on_deepspeed and taps:
            raise TrainerSetupError(
                f"{taps} act at taps, which pair the chosen and rejected rows of one backward pass; under DeepSpeed "
                "each side has its own. Use a rule that acts on the groups (balanced_dpo rule='norm'), or DDP."
            )
        if self._on_deepspeed and not split:
            raise TrainerSetupError("split_groups=False under DeepSpeed: the two sides are always captured as groups.")
        if self._on_deepspeed:  # no taps there (they only would log: balanced_dpo rule='norm')
            return _Plan(split=True, reduction=None)
        return _Plan(split=split, reduction=self._tap_reduction(plugins))

    def _tap_reduction(self, plugins: Sequence[Plugin]) -> str | None:
        """How the sequence log-prob the taps see is made (``"sum"``/``"mean"``), or ``None``: no taps."""
        if not any(isinstance(p, TapPlugin) for p in plugins):
            return None
        trainer: Any = self
        types = list(trainer.loss_types)
        preference = set(types) - _UNGROUPED
        needs = any(isinstance(p, TapPlugin) and p.needs_taps for p in plugins)
        problem = None
        if trainer.ld_alpha is not None:
            problem = f"ld_alpha={trainer.ld_alpha} weighs the tokens of each completion unequally"
        elif preference & _MEAN_STYLE and preference & _SUM_STYLE:
            problem = f"loss_type={types} mixes summed and token-mean log-probs ({sorted(preference & _MEAN_STYLE)})"
        if problem is None:
            return "mean" if preference <= _MEAN_STYLE else "sum"
        if needs:
            raise TrainerSetupError(
                f"A tap plugin needs one sequence log-prob per completion, but {problem}. Use a single kind of "
                "loss_type without ld_alpha, or a rule that acts on the groups (balanced_dpo rule='norm')."
            )
        return None  # taps only log (balanced_dpo rule='norm'): leave them out

    # -- the step ------------------------------------------------------------------------------
    def balanced_backward(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """TRL's DPO loss once, its gradient split into chosen, rejected and ungrouped (see the module docs)."""
        trainer: Any = self
        if self._on_deepspeed:
            return backward_per_side(self, model, inputs, num_items_in_batch)
        policy = PolicyForward(model)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(policy, inputs)
        if policy.log_probs is None or policy.leaf is None:
            raise GroupingError("BalancedDPOTrainer: the DPO loss did not run the policy model.")
        x, leaf = policy.log_probs, policy.leaf
        loss = self.scale_like_trainer(loss, num_items_in_batch)
        shift_mask = inputs["completion_mask"][..., 1:]
        sft = self._sft_term(leaf, shift_mask)
        preference = loss if sft is None else loss - self.scale_like_trainer(sft, num_items_in_batch)
        (grad,) = torch.autograd.grad(preference, leaf, retain_graph=True)
        pairs = x.shape[0] // 2
        plan = self._plan_for_balancer()
        at = x.view_as(x)
        if plan.reduction is None:
            split = (grad * at).sum()
        else:
            split = self._tapped_split(grad, at, inputs["completion_mask"], pairs, plan.reduction)
        surrogate = split
        if sft is not None:
            real_sft = self._sft_term(x, shift_mask)
            assert real_sft is not None
            surrogate = surrogate + self.scale_like_trainer(real_sft, num_items_in_batch)
        if trainer.aux_loss_enabled:  # a MoE model's load-balancing loss, as TRL adds it
            aux = trainer.router_aux_loss_coef * policy.outputs.aux_loss
            surrogate = surrogate + self.scale_like_trainer(aux, num_items_in_batch)
        if plan.split:
            self.backward_rows(surrogate, at=at, group=[CHOSEN] * pairs + [REJECTED] * pairs)
        else:  # only tap rules: they act inside this one backward pass, no group is needed
            trainer.accelerator.backward(surrogate)
        return loss.detach()

    def _plan_for_balancer(self) -> _Plan:
        """The plan for the Balancer being stepped (made once; also for a Balancer passed in ``optimizers=``)."""
        opt = self.balancer
        if self._plan is None or self._plan[0] != id(opt):
            self._plan = (id(opt), self._make_plan(opt.plugins))
        return self._plan[1]

    def _sft_term(self, log_probs: Tensor, shift_mask: Tensor) -> Tensor | None:
        """The ``"sft"`` part of TRL's loss (weighted): the mean NLL of the chosen completions' tokens;
        ``None`` without one. ``log_probs``: all rows, chosen first."""
        trainer: Any = self
        if "sft" not in trainer.loss_types:
            return None
        return self._sft_weight() * chosen_nll(log_probs.chunk(2, dim=0)[0], shift_mask.chunk(2, dim=0)[0])

    def _sft_weight(self) -> float:
        trainer: Any = self
        return sum(w for t, w in zip(trainer.loss_types, trainer.loss_weights, strict=True) if t == "sft")

    def _tapped_split(self, grad: Tensor, at: Tensor, completion_mask: Tensor, pairs: int, reduction: str) -> Tensor:
        """``Σ G·x'`` rewritten through tapped sequence log-probs (equal value of the gradient)."""
        width = completion_mask.shape[1] - 1
        kept, dropped = grad[:, -width:], grad[:, :-width]
        per_row = kept[:, :1]
        scale = per_row.abs().amax() * 1e-5 + torch.finfo(grad.dtype).tiny
        if (dropped.numel() and dropped.abs().amax() > scale) or (kept - per_row).abs().amax() > scale:
            raise GroupingError(
                "BalancedDPOTrainer with taps: the preference loss's gradient is not the same for every token of "
                "a completion, so it does not depend on one sequence log-prob per completion (a per-token loss?). "
                "Use plugins without taps (balanced_dpo rule='norm')."
            )
        sequence = at[:, -width:].sum(dim=1)
        g = per_row.squeeze(1)
        if reduction == "mean":
            tokens = completion_mask.sum(dim=1).clamp(min=1.0).to(sequence.dtype)  # as TRL divides
            sequence, g = sequence / tokens, g * tokens
        tapped_w, tapped_l = tap_pairs(self.balancer, sequence[:pairs], sequence[pairs:])  # chosen, rejected
        return (g.detach() * torch.cat([tapped_w, tapped_l])).sum()
