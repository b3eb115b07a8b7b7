"""Clipping the update the inner optimizer receives, with ``torch.nn.utils.clip_grad_norm_``'s semantics.

The update is ``u = s · (b + Σ_k w_k g_k)``: ``b`` the ungrouped gradient, ``s`` the GradScaler's
``1/scale`` (1 without AMP). Its total norm is ``‖u‖``; the clip coefficient is
``min(1, max_norm / (‖u‖ + 1e-6))`` and ``u`` is multiplied by it, as torch does.

While groups are pending ``.grad`` does not hold ``u`` (the group gradients are in their rows), so
the norm has to come from the Balancer. Two ways, chosen per step (:func:`balancer.step.plan.clip_route`):

* **Gram** (L2 norm): ``‖u‖² = s² vᵀ Ĝ v`` with ``v = [w; 1]`` and ``Ĝ`` the Gram matrix of
  ``[g_1 … g_k; b]``, which the local backend computes in the same GEMM as the statistics (the
  ungrouped gradient lies right before the rows). No pass over the gradients beyond the step's
  own, and the coefficient is folded into the weights of the one combination.
* **Combined**: write ``u``, take its norm, scale it: what torch does, one more pass over ``n``
  numbers (not ``k·n``). For other norm types, and for the layer capture, which has no rows.

Its accuracy differs in one place: from the Gram matrix, ``‖u‖`` has an absolute error of about
``sqrt(ε) · max_k |w_k| ‖g_k‖`` (float32 Gram), so an update that nearly cancels (opposite group
gradients) has a less accurate norm than its parts. Clipping engages only when ``‖u‖`` exceeds
``max_norm``, where this does not matter in practice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from balancer.contract.backend import Backend
from balancer.errors import CaptureError, NonFiniteGradientError

if TYPE_CHECKING:
    from balancer.capture.source import CaptureSource

__all__ = ["ClipRequest", "check_clip", "clip_coefficient", "clip_in_place", "gram_norm"]

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm


@dataclasses.dataclass(frozen=True)
class ClipRequest:
    """One clip: to ``max_norm`` in the ``norm_type`` norm; ``error_if_nonfinite`` as in torch."""

    max_norm: float
    norm_type: float = 2.0
    error_if_nonfinite: bool = False

    @classmethod
    def make(cls, max_norm: Any, norm_type: Any = 2.0, error_if_nonfinite: bool = False) -> ClipRequest:
        """Validates the arguments (the names are those of ``clip_grad_norm_``)."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not max_norm >= 0:
            raise ValueError(
                f"`max_norm` must be a number >= 0 (the largest norm of the update). Found `max_norm = {max_norm!r}`."
            )
        if isinstance(norm_type, str) and norm_type.lower() == "inf":
            norm_type = math.inf
        if isinstance(norm_type, bool) or not isinstance(norm_type, int | float) or not norm_type > 0:
            raise ValueError(
                "`norm_type` must be a number > 0 or 'inf' (2.0: the Euclidean norm). "
                f"Found `norm_type = {norm_type!r}`."
            )
        return cls(float(max_norm), float(norm_type), bool(error_if_nonfinite))

    @property
    def euclidean(self) -> bool:
        return self.norm_type == 2.0


def clip_coefficient(total: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total + 1e-6))``, on the device (no host sync), like torch."""
    return (max_norm / (total + CLIP_EPS)).clamp(max=1.0)


def gram_norm(gram: Tensor, weights: Tensor, scale: float, dropped: list[bool]) -> Tensor:
    """``‖s (b + Σ w_k g_k)‖`` from the ``[k+1, k+1]`` Gram matrix of ``[g_1 … g_k; b]``.

    Dropped (non-finite) groups have weight 0 and their NaN entries are left out; a non-finite
    ungrouped gradient makes the norm non-finite, as in torch. Rounding can make ``vᵀĜv``
    slightly negative for an update that cancels: it is clamped to 0.
    """
    k = weights.shape[0]
    v = torch.cat([weights, weights.new_ones(1)])
    if any(dropped):
        keep = torch.tensor([not d for d in dropped] + [True], device=gram.device)
        gram = torch.where(keep[:, None] & keep[None, :], gram, 0.0)
    assert gram.shape == (k + 1, k + 1)
    return (v @ gram @ v).clamp_min(0.0).sqrt() * abs(scale)


def has_update_norm(source: CaptureSource) -> bool:
    """Whether ``source`` can measure (and scale) the written update itself, beyond the Gram route."""
    return type(source).update_norm is not Backend.update_norm


def check_clip(backend: Backend, request: ClipRequest, where: str) -> None:
    """Refuses a clip the backend cannot do, or one the framework would repeat."""
    framework = backend.framework_clipping()
    if framework is not None:
        raise CaptureError(
            f"{where}: the framework already clips the balanced update to {framework} (DeepSpeed's "
            "`gradient_clipping`). Clipping here as well would clip twice: set gradient_clipping to 0 in the "
            "DeepSpeed config to clip with the Balancer, or leave it to DeepSpeed (last_stats.grad_norm and "
            "clip_coef still report its clip)."
        )
    if not request.euclidean and not has_update_norm(backend):
        raise ValueError(
            f"{where}: norm_type={request.norm_type} is not available with {type(backend).__name__}, "
            "which clips from the Gram matrix: use norm_type=2.0."
        )


def clip_in_place(backend: Backend, request: ClipRequest, scale: float) -> Tensor:
    """No group pending: clip ``.grad`` itself, exactly as torch does (``scale``: 1 / the loss scale)."""
    total = backend.update_norm(request.norm_type) * scale
    if request.error_if_nonfinite and not bool(torch.isfinite(total).item()):
        raise NonFiniteGradientError(
            f"The total {request.norm_type}-norm of the gradients is {total.item()} (non-finite), so it "
            "cannot be clipped. Check the losses, or clip with error_if_nonfinite=False."
        )
    backend.scale_update(clip_coefficient(total, request.max_norm))
    return total
