"""The pending step: everything captured for the next ``step()``, forgotten in one place.

:class:`PendingStep` holds the two capture sources (the backend's group rows and, with a model,
the layer capture) and the step's bookkeeping: loss values and backward calls per group, the
groups dropped as non-finite, the tap statistics, the Gram matrix measured so far and the plan
``clip_grad_norm_`` made. :meth:`PendingStep.clear` forgets all of it, after a step or on
``zero_grad``. It also enforces one capture mode per step: group blocks (``opt.group``,
``opt.backward``, ``opt.backward_rows``) or the layer capture (``opt.backward_samples``/``opt.backward_tasks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from balancer._checks import check_group_name
from balancer.capture.layer_capture import LayerCapture
from balancer.capture.source import CaptureSource
from balancer.capture.taps import TapHub
from balancer.contract.backend import Backend
from balancer.errors import CaptureError

if TYPE_CHECKING:
    from balancer.step.plan import StepPlan

__all__ = ["PendingStep"]


class PendingStep:
    """What has been captured for the next step, and where it came from."""

    def __init__(self, backend: Backend, layers: LayerCapture | None, taps: TapHub) -> None:
        self.backend = backend
        self.layers = layers
        self.taps = taps
        self.losses: dict[str, Tensor] = {}  # summed loss value per group, when recorded
        self.captures: dict[str, int] = {}  # backward calls per group
        self.dropped: set[str] = set()  # non-finite groups (their rows were zeroed)
        self.measured: tuple[Tensor, bool, bool] | None = None  # the Gram so far (see _step.measure)
        self.plan: StepPlan | None = None  # planned early by clip_grad_norm_

    @property
    def source(self) -> CaptureSource:
        """Where this step's groups live: the layer capture once it holds a group, else the backend."""
        layers = self.layers
        return layers if layers is not None and layers.names else self.backend

    # -- capture -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def group(self, name: str) -> Iterator[None]:
        """Gradients of the backward passes inside the block go to ``name``'s row of the backend."""
        check_group_name(name)
        active = self.backend.active
        if active is not None:
            raise CaptureError(
                f"Cannot enter group `{name}` inside group `{active}`: group blocks do not nest. "
                "Close the first block before opening the next."
            )
        self.start(f"opt.group({name!r})")
        if self.layers is not None and self.layers.names:
            raise CaptureError(
                f"Cannot capture group `{name}` with `opt.group(...)`/`opt.backward(...)` in a step that used "
                "`backward_samples`/`backward_tasks`: use one way per step (call step() or zero_grad() in between)."
            )
        self.backend.enter(name)
        self.captures[name] = self.captures.get(name, 0) + 1
        try:
            yield
        finally:
            self.backend.exit()

    def backward(self, losses: Mapping[str, Tensor], retain_graph: bool | None) -> None:
        """One backward pass per group, each in its group block (every one but the last retains
        the graph); the loss values are recorded."""
        items = list(losses.items())
        for i, (name, loss) in enumerate(items):
            with self.group(name):
                keep = True if i < len(items) - 1 else retain_graph
                self.backend.backward(loss, retain_graph=keep)
            self.add_loss(name, loss.detach().reshape(()).to(torch.float64))

    def layer_capture(self, method: str) -> LayerCapture:
        """The layer capture, for ``method`` (``"backward_samples"``/``"backward_tasks"``)."""
        if self.layers is None:
            raise CaptureError(f"{method} needs the model: build the Balancer with `model=model`.")
        if self.backend.names:
            raise CaptureError(
                f"{method} cannot be mixed with `opt.group`/`opt.backward`/`opt.backward_rows` in one step (groups "
                f"{list(self.backend.names)} are pending). Call step() or zero_grad() first."
            )
        self.start(method)
        return self.layers

    def start(self, what: str) -> None:
        """A capture starts: the measured statistics are stale; after clip_grad_norm_ it is refused."""
        if self.plan is not None:
            raise CaptureError(
                f"{what} after opt.clip_grad_norm_() in the same step: the norm was measured without these "
                "gradients. Clip after the last backward pass of the step, right before step()."
            )
        self.measured = None

    def record(self, losses: Mapping[str, Tensor]) -> None:
        """Adds a layer capture's loss values to the step's, and counts one backward call per group."""
        for name, value in losses.items():
            self.add_loss(name, value)
            self.captures[name] = self.captures.get(name, 0) + 1

    def add_loss(self, name: str, value: Tensor) -> None:
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    # -- forgetting ----------------------------------------------------------------------------
    def forget_plan(self) -> None:
        """The plan and the measured statistics no longer hold (a failed or skipped step)."""
        self.plan, self.measured = None, None

    def clear(self) -> None:
        """Forgets the step's bookkeeping (the sources forget their groups in end_step/zero_grad)."""
        self.taps.discard()
        self.losses.clear()
        self.captures.clear()
        self.dropped.clear()
        self.forget_plan()

    def end_step(self) -> None:
        """After a committed step: the sources' groups and the bookkeeping are forgotten."""
        self.backend.end_step()
        if self.layers is not None:
            self.layers.end_step()
        self.clear()

    def zero_grad(self, set_to_none: bool) -> None:
        """Discards everything pending; the backend clears ``.grad``."""
        self.backend.zero_grad(set_to_none)
        if self.layers is not None:
            self.layers.zero_grad(set_to_none)
        self.clear()
