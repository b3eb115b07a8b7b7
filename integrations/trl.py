"""TRL's trainers with a :class:`~balancer.Balancer`: balanced DPO, multi-task GRPO and multi-task SFT.

Each is the TRL trainer with :class:`~balancer.integrations.transformers.BalancerTrainerMixin`:
the optimizer is wrapped in a Balancer (``balancer=[...]``), clipping acts on the balanced update,
the logged ``grad_norm`` is that update's norm, checkpoints carry the plugin states, and each log
adds the per-group norms, weights and plugin metrics. What the groups are:

* :class:`BalancedDPOTrainer`: ``"chosen"`` and ``"rejected"``, the exact split of the preference
  loss's gradient at TRL's per-token log-probabilities (:mod:`._trl_dpo`);
* :class:`BalancedGRPOTrainer`: the tasks of a dataset column (``group_by=``), the exact split of
  the policy loss by completion (:mod:`._trl_grpo`);
* :class:`BalancedSFTTrainer`: the values of a dataset column (``group_by=``), one forward and
  backward per group in each micro-batch (:mod:`._trl_sft`).

Terms that are not part of the split (DPO's ``"sft"`` term, GRPO's KL and entropy terms, MoE
auxiliary losses) are ungrouped: added to the update with weight 1. With no plugin each trainer's
run equals the plain TRL trainer's to float rounding. Needs the ``trl`` extra:
``pip install 'gradient-balancer[trl]'``.
"""

from __future__ import annotations

try:
    import trl  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("balancer.integrations.trl needs TRL: pip install 'gradient-balancer[trl]'") from exc

from ._trl_dpo import BalancedDPOTrainer
from ._trl_grpo import BalancedGRPOTrainer
from ._trl_sft import BalancedSFTTrainer

__all__ = ["BalancedDPOTrainer", "BalancedGRPOTrainer", "BalancedSFTTrainer"]
