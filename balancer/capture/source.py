"""The capture source: what one step of the :class:`~balancer.Balancer` reads and writes of its groups.

A step's groups come from one source: the backend's group rows (``opt.group``/``opt.backward``,
every :class:`~balancer.contract.backend.Backend` is a source) or the layer capture
(``opt.backward_samples``/``opt.backward_tasks``, :class:`~balancer.capture.layer_capture.LayerCapture`).
Only the way groups come in differs; from then on the step (:mod:`balancer.step.plan`) drives either
through this protocol. One source per step: mixing the two is refused at capture
(:class:`~balancer.step.pending.PendingStep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from balancer.contract.combine import BoundRule

__all__ = ["CaptureSource"]


class CaptureSource(Protocol):
    """The groups of one step, their statistics and the update written from them.

    The meaning of each member is that of the :class:`~balancer.contract.backend.Backend` method
    of the same name.
    """

    ungrouped_gram: bool

    @property
    def names(self) -> tuple[str, ...]: ...

    @property
    def stats_device(self) -> torch.device: ...

    @property
    def gram_floor(self) -> float: ...

    def gram(self, *, ungrouped: bool = False) -> Tensor: ...

    def refine_gram(self, gram: Tensor, rows: Sequence[int]) -> Tensor: ...

    def drop(self, rows: Sequence[int]) -> None: ...

    def expose_ungrouped(self, poison: Tensor | None = None) -> None: ...

    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0, rule: BoundRule | None = None) -> None: ...

    def update_norm(self, norm_type: float) -> Tensor: ...

    def scale_update(self, factor: Tensor) -> None: ...

    def capture_token(self) -> Any: ...

    def revert(self) -> None: ...

    def end_step(self) -> None: ...

    def zero_grad(self, set_to_none: bool) -> None: ...
