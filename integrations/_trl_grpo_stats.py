"""The per-task metrics that ``BalancedGRPOTrainer`` logs: scores of each generation batch, norms of each step.

Every generation batch logs, per task, the mean reward, the mean advantage, the mean absolute
advantage and the number of completions (:meth:`TaskMetrics.log_scores`).

``task_stats=True`` adds what Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task
LLMs* (arXiv 2510.19178), measure:

* the halves: each task's prompts in the generation batch are dealt alternately into halves
  ``task/A`` and ``task/B`` (:meth:`TaskMetrics.split_halves`; :func:`row_groups` names each
  completion's group), captured by the Balancer as separate groups (the trainer wraps the plugins
  in :class:`~balancer.recipes.split_half.SplitHalf` so that they still weigh tasks);
* after each optimizer step (:meth:`TaskMetrics.record`), from the Gram matrix of the group
  gradients: each task's squared gradient norm ``‖g_A + g_B‖²`` (biased upward by sampling noise)
  and the split-half estimate ``n²/(a·b) ⟨g_A, g_B⟩`` of ``‖E g‖²``. The estimate is unbiased
  because the halves are independent samples taken at the same parameters, so
  ``E ⟨g_A, g_B⟩ = ⟨E g_A, E g_B⟩``. With ``num_iterations > 1`` that fails from the second
  iteration on (the parameters were already updated on both halves), so the trainer refuses
  ``task_stats=True`` there.
* the learning gain: a task's mean reward now minus at the previous generation batch that held it.
  That last reward per task is the metrics' state (:meth:`TaskMetrics.state_dict`), saved with each
  checkpoint, so a resumed run logs the same gains.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from balancer.contract.stats import GroupStats
from balancer.recipes.split_half import half_groups

__all__ = ["HALF_KEY", "TaskMetrics", "row_groups", "total_rewards"]

HALF_KEY = "balancer_half"  # LongTensor [rows] with task_stats=True: 0 (half A), 1 (half B), -1 (not split)

Metrics = defaultdict[str, list[float]]  # TRL's metrics of one mode ("train" or "eval"): key -> values to average


def total_rewards(per_func: Tensor | None, weights: Tensor, rows: int) -> Tensor:
    """Each completion's reward as TRL sums it (weighted over the reward functions, ignoring NaN, NaN when every
    function returned NaN), from TRL's ``[completions, functions]`` rewards; all NaN when they are not for
    ``rows`` completions."""
    if per_func is None or per_func.shape[0] != rows:
        return torch.full((rows,), float("nan"))
    per_func = per_func.detach().cpu().float()
    rewards = (per_func * weights.detach().cpu().float()).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = float("nan")
    return rewards


def row_groups(names: list[str], tasks: Tensor, halves: Tensor | None) -> list[str]:
    """Each completion's Balancer group: its task (an index into ``names``), or with halves (``HALF_KEY``) the
    half ``task/A`` or ``task/B`` it was dealt into, the task itself where it was not split."""
    tasks_of_rows = [names[k] for k in tasks.tolist()]
    if halves is None:
        return tasks_of_rows
    return [task if h < 0 else half_groups(task)[h] for task, h in zip(tasks_of_rows, halves.tolist(), strict=True)]


class TaskMetrics:
    """The per-task metrics of one trainer, and the little state they need between calls.

    Args:
        split_half: ``task_stats=True``: split tasks into halves, log the learning gain and the per-step norms.
    """

    def __init__(self, split_half: bool) -> None:
        self.split_half = split_half
        self.half_counts: dict[str, tuple[int, int]] = {}  # task -> prompts in halves A and B, last generation
        self.last_reward: dict[str, float] = {}  # task -> mean reward at the last generation that held it
        self.recorded_step = -1  # the optimizer step whose norms were last recorded

    def state_dict(self) -> dict[str, dict[str, float]]:
        """What the learning gain needs across a checkpoint: each task's last mean reward."""
        return {"last_reward": dict(self.last_reward)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.last_reward = {str(task): float(reward) for task, reward in state["last_reward"].items()}

    def log_scores(
        self, metrics: Metrics, names: list[str], tasks: Tensor, rewards: Tensor, advantages: Tensor, train: bool
    ) -> None:
        """Per task present in ``tasks`` (each completion's index into ``names``): mean reward, mean advantage,
        mean |advantage|, completions; with ``split_half`` in training, the learning gain. ``rewards`` and
        ``advantages`` hold one value per completion, gathered over the processes."""
        for k in tasks.unique().tolist():
            task, rows = names[k], tasks == k
            reward = float(torch.nanmean(rewards[rows]))
            metrics[f"balancer/reward/{task}"].append(reward)
            metrics[f"balancer/advantage/{task}"].append(float(advantages[rows].mean()))
            metrics[f"balancer/abs_advantage/{task}"].append(float(advantages[rows].abs().mean()))
            metrics[f"balancer/completions/{task}"].append(float(rows.sum()))
            if self.split_half and train:
                if task in self.last_reward:
                    metrics[f"balancer/learning_gain/{task}"].append(reward - self.last_reward[task])
                self.last_reward[task] = reward

    def split_halves(self, names: list[str], tasks: Tensor, generations: int) -> Tensor:
        """Each completion's half: a task's prompts (``generations`` consecutive completions each) alternate
        between A (0) and B (1) in order; a task with one prompt in the batch is not split (-1)."""
        per_prompt = tasks[::generations].tolist()
        half = [0] * len(per_prompt)
        self.half_counts = {}
        for k in set(per_prompt):
            prompts = [i for i, t in enumerate(per_prompt) if t == k]
            for j, i in enumerate(prompts):
                half[i] = j % 2 if len(prompts) > 1 else -1
            if len(prompts) > 1:
                self.half_counts[names[k]] = ((len(prompts) + 1) // 2, len(prompts) // 2)
        return torch.tensor(half, dtype=torch.long).repeat_interleave(generations)

    def record(self, step: int, metrics: Metrics, names: list[str], stats: GroupStats | None) -> None:
        """Once per optimizer ``step``, per task of the step (``stats`` the Balancer's ``last_stats``): ``‖g_t‖²``
        (with ``g_t = g_A + g_B``) and the split-half estimate ``n²/(a·b) ⟨g_A, g_B⟩`` of ``‖E g_t‖²`` for
        ``a``, ``b`` prompts in the halves (``n = a + b``; ``4 ⟨g_A, g_B⟩`` when they are equal)."""
        if step == self.recorded_step:
            return
        self.recorded_step = step
        if stats is None:
            return
        gram = stats.gram.detach().cpu()
        where = {name: i for i, name in enumerate(stats.names)}
        sq_norms = []
        for task in names:
            a_name, b_name = half_groups(task)
            if a_name in where and b_name in where:
                a, b = where[a_name], where[b_name]
                sq = float(gram[a, a] + gram[b, b] + 2 * gram[a, b])
                na, nb = self.half_counts.get(task, (1, 1))
                metrics[f"balancer/split_half_sq_norm/{task}"].append(float(gram[a, b]) * (na + nb) ** 2 / (na * nb))
            elif task in where:
                sq = float(gram[where[task], where[task]])
            else:
                continue
            metrics[f"balancer/sq_norm/{task}"].append(sq)
            sq_norms.append(sq)
        if len(sq_norms) > 1 and min(sq_norms) > 0:
            metrics["balancer/sq_norm_ratio"].append(max(sq_norms) / min(sq_norms))
