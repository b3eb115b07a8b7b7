"""``krum``: (Multi-)Krum, Byzantine-robust selection (Blanchard et al., NeurIPS 2017), from the Gram matrix."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting
from balancer.errors import PluginError

__all__ = ["Krum", "KrumOptions"]


class KrumOptions(PluginOptions):
    """Options of :class:`Krum`."""

    n_byzantine: int = Field(0, ge=0, description="f: how many groups may be adversarial.")
    n_selected: int = Field(1, ge=1, description="m: how many groups with the best scores are averaged (Multi-Krum).")


class Krum(GramWeighting[State]):
    """Averages the groups whose gradients lie closest to their neighbours (Blanchard et al. 2017).

    Blanchard, El Mhamdi, Guerraoui, Stainer, *Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent*, NeurIPS 2017 (Krum, and Multi-Krum with ``m > 1``). With ``k`` groups of
    which up to ``f`` may be adversarial, each group's score is the sum of its distances to its
    ``k - f - 2`` nearest other groups; the ``m`` groups with the lowest scores are averaged::

        a_i = 1/m  for the m lowest scores,  0 otherwise

    The distances come from the Gram matrix, ``‖g_i - g_j‖² = G_ii + G_jj - 2 G_ij``, so nothing
    beyond it is read. As in torchjd 0.18 the distances are Euclidean (not squared, as in the
    paper's definition); the selection is the same whenever the nearest neighbours are, and it
    is tested against both. Needs ``k ≥ f + 3`` and ``k ≥ m`` groups in the step, else it raises
    :class:`~balancer.errors.PluginError` (a Python check of the number of groups, no tensor read).
    Ties in the scores are broken by position, as ``torch.topk`` does. With incoming weights ``w``
    it selects among the gradients ``w_i g_i`` and returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("krum", {"n_byzantine": 1})])
    """

    name = "krum"
    Options = KrumOptions
    options: KrumOptions

    @property
    def min_groups(self) -> int:
        """``max(n_byzantine + 3, n_selected)``."""
        return max(self.options.n_byzantine + 3, self.options.n_selected)

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        k, f, m = stats.num_groups, self.options.n_byzantine, self.options.n_selected
        if k < self.min_groups:
            raise PluginError(
                f"krum needs at least n_byzantine + 3 = {f + 3} and n_selected = {m} groups in a step; this step has "
                f"{k} ({list(stats.names)}). Capture more groups, or lower n_byzantine / n_selected."
            )
        squared = stats.gram.diagonal()
        distances = (squared[:, None] + squared[None, :] - 2.0 * stats.gram).clamp_min(0.0).sqrt()
        nearest, _ = torch.topk(distances, k=k - f - 1, dim=1, largest=False)  # itself (0) and k - f - 2 others
        scores = nearest[:, 1:].sum(dim=1)
        _, chosen = torch.topk(scores, k=m, largest=False)
        return torch.zeros_like(scores).index_fill(0, chosen, 1.0 / m), state
