"""Small helpers shared by the Gram-based aggregators."""

from __future__ import annotations

from torch import Tensor

__all__ = ["weighted_gram"]


def weighted_gram(gram: Tensor, weights: Tensor) -> Tensor:
    """The Gram matrix of the gradients ``w_i g_i`` that the plugins before this one produced.

    Plugins compose by multiplying weights: an aggregator later in the list aggregates the
    already-weighted gradients ``w_i g_i``, whose Gram matrix is ``diag(w) G diag(w)``, and
    returns ``w * a`` for its own coefficients ``a``.
    """
    return weights[:, None] * gram * weights[None, :]
