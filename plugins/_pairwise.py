"""Helpers of the aggregators that edit each gradient against the others (``pcgrad``, ``gradvac``).

Both methods are homogeneous: rescaling ``g_i`` rescales the edited ``g_i`` by the same factor,
and rescaling ``g_j`` changes nothing in how much of ``g_j`` is added to ``g_i``. So they run
on unit vectors ``u_i = g_i / ‖g_i‖`` (their Gram matrix is the cosine matrix), which keeps every
intermediate number of order one whatever the gradient norms, and the coefficients are mapped
back at the end. A zero gradient has a zero row in the cosine matrix: it edits nothing and is
never edited.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pinv_ones", "to_gradient_weights", "unit_cosines"]


def unit_cosines(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(cosines, norms)`` of the gradients behind ``gram``; zero rows and columns for zero gradients."""
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms > 0
    inverse = torch.where(nonzero, norms, torch.inf).reciprocal()  # 1/‖g_i‖, 0 for a zero gradient
    cosines = (gram * inverse[:, None] * inverse[None, :]).clamp(-1.0, 1.0)
    cosines.diagonal().copy_(nonzero)  # exactly 1, and 0 for a zero gradient
    return cosines, norms


def to_gradient_weights(coefficients: Tensor, norms: Tensor) -> Tensor:
    """Weights ``a`` with ``Σ_i edited_i = Σ_j a_j g_j`` from unit-vector coefficients.

    ``coefficients[i, j]`` is the amount of ``u_j`` in the edited ``u_i``; the edited ``g_i`` is
    ``‖g_i‖`` times that, so ``a_j = c_jj + Σ_{i≠j} ‖g_i‖ c_ij / ‖g_j‖``. A zero ``g_j`` keeps
    ``a_j = c_jj`` (its own coefficient): nothing was ever added along it.
    """
    added = norms @ coefficients.clone().fill_diagonal_(0.0)  # Σ_{i≠j} ‖g_i‖ c_ij
    return coefficients.diagonal() + torch.where(norms > 0, added / norms, 0.0)


def pinv_ones(cosines: Tensor, nonzero: Tensor, rtol: float) -> Tensor:
    """``C⁺ 1_nonzero`` for a cosine matrix ``C`` (``imtl_g``, ``config``): the pseudo-inverse from
    ``torch.linalg.eigh``, eigenvalues at or below ``rtol · k · λ_max`` counted as zero (dependent
    groups). On CUDA ``eigh`` reads its own error code on the host."""
    eigenvalues, vectors = torch.linalg.eigh(cosines)
    kept = eigenvalues > rtol * cosines.shape[0] * eigenvalues.max().clamp_min(0.0)
    inverse = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
    return vectors @ (inverse * (vectors.T @ nonzero.to(cosines.dtype)))
