"""``aligned_mtl``: Aligned-MTL (Senushkin et al., CVPR 2023), from the eigendecomposition of the Gram matrix."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions, State
from balancer.contract.weighting import GramWeighting

__all__ = ["AlignedMTL", "AlignedMTLOptions"]


class AlignedMTLOptions(PluginOptions):
    """Options of :class:`AlignedMTL`."""

    scale_mode: Literal["min", "median", "mean", "rmse"] = Field(
        "min",
        description="Eigenvalue λ_s the aligned singular values are set to: the smallest kept one (the paper), "
        "the median, or the mean ('rmse' is the original code's name for the mean).",
    )
    rtol: float = Field(
        2.220446049250313e-16,
        gt=0.0,
        lt=1e-3,
        description="Eigenvalues below rtol·k·(largest) are dropped as numerical zeros (default: float64 eps).",
    )


def _kept_median(eigenvalues: Tensor, kept: Tensor) -> Tensor:
    """The lower median of the kept eigenvalues (``torch.median``'s convention), without a host sync.

    ``eigh`` returns them in ascending order and the kept ones are the largest, so they are the
    last ``r`` entries and their lower median sits at index ``k - r + (r - 1) // 2``.
    """
    k = eigenvalues.shape[0]
    r = kept.sum()
    index = (k - r + torch.div(r - 1, 2, rounding_mode="floor")).clamp(0, k - 1)
    return eigenvalues.gather(0, index.reshape(1))[0]


class AlignedMTL(GramWeighting[State]):
    """Aligns the principal components of the group gradients to equal strength (Senushkin et al. 2023).

    Senushkin, Patakin, Kuznetsov, Konushin, *Independent Component Alignment for Multi-Task
    Learning*, CVPR 2023 (Algorithm 1). With the gradients as rows of ``A`` and ``G = A Aᵀ =
    V Λ Vᵀ`` (keeping the ``r`` eigenvalues above the rank threshold), the aligned gradients
    ``Â = B A`` with::

        B = √λ_s · V Λ^{-1/2} Vᵀ          (so Â Âᵀ = λ_s · V Vᵀ: equal singular values)

    have a condition number of one; ``λ_s`` is the smallest kept eigenvalue (``scale_mode="min"``,
    the paper), their median or their mean. The update is the mean of the aligned gradients,
    ``d = Âᵀ 1/k = Aᵀ B 1/k``, so the plugin returns ``a = B 1 / k`` (the preference vector of
    torchjd's default; the paper allows task weights there). With every eigenvalue below the
    threshold (all gradients zero), ``B = I``, as in torchjd.

    ``B`` does not change when ``G`` is multiplied by a constant, so the plugin divides ``G`` by its
    largest diagonal entry before the decomposition: only the ratios matter. The method is not
    invariant to rescaling one group (it aligns the raw gradients): a group whose gradient is
    1e8 times smaller than another's contributes an eigenvalue below float64 precision and is
    dropped with it, as in every float64 implementation. With incoming weights ``w`` it aligns
    the gradients ``w_i g_i`` and returns ``w * a``.

    Uses ``torch.linalg.eigh``; on CUDA that kernel reads its own error code on the host, the
    only synchronisation in this plugin.

    Example::

        opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=[("aligned_mtl", {"scale_mode": "median"})])
    """

    name = "aligned_mtl"
    Options = AlignedMTLOptions
    options: AlignedMTLOptions

    def weigh(self, stats: GroupStats, state: State) -> tuple[Tensor, State]:
        gram = stats.gram
        k = gram.shape[0]
        largest = gram.diagonal().max().clamp_min(0.0)
        gram = gram / torch.where(largest > 0, largest, 1.0)
        eigenvalues, vectors = torch.linalg.eigh(gram)
        kept = eigenvalues > self.options.rtol * k * eigenvalues.max().clamp_min(0.0)
        kept = kept & (eigenvalues > 0)
        safe = torch.where(kept, eigenvalues, 1.0)
        mode = self.options.scale_mode
        if mode == "min":
            scale = torch.where(kept, eigenvalues, torch.inf).min()
        elif mode == "median":
            scale = _kept_median(eigenvalues, kept)
        else:
            scale = torch.where(kept, eigenvalues, 0.0).sum() / kept.sum().clamp_min(1)
        any_kept = kept.any()
        scale = torch.where(any_kept, scale, 0.0)
        inverse_root = torch.where(kept, safe.rsqrt(), 0.0)
        mean = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        aligned = scale.sqrt() * (vectors @ (inverse_root * (vectors.T @ mean)))
        factors = torch.where(any_kept, aligned, mean)
        return factors, state
