"""The backend seam: where group gradients live and how their statistics are reduced.

The :class:`~balancer.Balancer` core only talks to a :class:`Backend`. The local backend
(:mod:`balancer.local`) keeps one flat ``[k, n]`` buffer per (device, dtype); distributed
backends (DDP, FSDP2, DeepSpeed ZeRO, in ``balancer.integrations``) keep each rank's share of
the reduced group gradients and add one all-reduce of the packed Gram matrix.

The step protocol, as the core drives it::

    backend.enter(name) ... backward ... backend.exit()      # any number of times, any order
    gram = backend.gram()           # [k, k] float64, global, on backend.stats_device
    backend.drop(rows)              # only when some groups were non-finite
    backend.combine(weights, ...)   # Σ_k w_k g_k (+ ungrouped) where the inner optimizer reads it
    backend.optimizer_step(closure)     # inner.step(), or engine.step() for DeepSpeed
    backend.end_step()

A backend is chosen from what ``Balancer(...)`` is given: integrations implement the hook
``balancer_make_backend(target)``; a plain ``torch.optim.Optimizer`` that no integration claims
gets the :class:`~balancer.local.LocalBackend`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Backend", "NaNFlag"]


class NaNFlag:
    """Plants a NaN into one gradient element when a device-side flag is set, without a host
    sync, and puts the element back afterwards: how a backend shows ``GradScaler`` group
    gradients that are not in ``.grad`` (see :meth:`Backend.expose_ungrouped`)."""

    def __init__(self) -> None:
        self._saved: tuple[Tensor, Tensor] | None = None

    def plant(self, element: Tensor, flag: Tensor) -> None:
        """``element`` (a one-element view into a ``.grad``) becomes NaN where ``flag`` is true."""
        self.restore()
        self._saved = (element, element.clone())
        element.add_(torch.where(flag.to(element.device), float("nan"), 0.0).to(element.dtype))

    def restore(self) -> None:
        if self._saved is not None:
            element, saved = self._saved
            element.copy_(saved)
            self._saved = None


class Backend(abc.ABC):
    """Holds the group gradients of one step and computes their statistics."""

    @property
    @abc.abstractmethod
    def optimizer(self) -> Any:
        """The optimizer whose ``param_groups``, ``state``, ``defaults``, ``state_dict`` and
        ``load_state_dict`` the Balancer forwards (for DeepSpeed: the engine's optimizer)."""

    def attach(self, balancer: Any) -> None:
        """Called once by the :class:`~balancer.Balancer` that drives this backend."""

    def trained_parameters(self) -> list[Tensor]:
        """The model parameters whose gradients are captured (for input checks)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def backward(self, loss: Tensor, retain_graph: bool | None = None) -> None:
        """Runs one backward pass of ``loss`` (a framework may need its own, e.g. ``engine.backward``)."""
        loss.backward(retain_graph=retain_graph)

    def optimizer_step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Applies the combined gradient: ``optimizer.step(closure)`` unless the framework steps itself."""
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def __init__(self) -> None:
        self._names: list[str] = []  # groups of this step, in first-entry order; row i is _names[i]
        self._active: int | None = None  # row being captured

    @property
    def names(self) -> tuple[str, ...]:
        """Groups that have been entered since the last ``end_step``, in first-entry order."""
        return tuple(self._names)

    @property
    def active(self) -> str | None:
        """The group currently being captured, or ``None``."""
        return None if self._active is None else self._names[self._active]

    @property
    @abc.abstractmethod
    def stats_device(self) -> torch.device:
        """Device of the Gram matrix and weights."""

    @abc.abstractmethod
    def enter(self, name: str) -> None:
        """Routes gradients produced from now on into group ``name``'s row."""

    @abc.abstractmethod
    def exit(self) -> None:
        """Routes gradients back to the ungrouped gradient."""

    @abc.abstractmethod
    def gram(self) -> Tensor:
        """The exact global ``[k, k]`` float64 Gram matrix of the present groups."""

    def reserve_rows(self, count: int) -> None:
        """A hint from a checkpoint: steps capture up to ``count`` groups, so room for them may be
        made in one piece at the first capture (as in a long run) instead of group by group."""

    @property
    def world_size(self) -> int:
        """Number of data-parallel ranks whose statistics are reduced together (1 locally)."""
        return 1

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """``tensor`` reduced over the data-parallel ranks with ``op`` (``"sum"`` or ``"max"``);
        the identity for one process. Every rank must call it at the same point."""
        return tensor

    def reduce_losses(self, losses: Tensor) -> Tensor:
        """Averages per-group loss values across data-parallel ranks (identity for one process)."""
        return losses

    @abc.abstractmethod
    def expose_ungrouped(self, poison: Tensor | None = None) -> None:
        """Makes every parameter's ``.grad`` hold its ungrouped gradient (zeros where there is none).

        If ``poison`` (a 0-d bool tensor) is true, a NaN is written into one ungrouped element,
        without synchronising with the device, so that a gradient checker reading ``.grad``
        (``GradScaler``) sees the non-finite group gradients. :meth:`combine` or
        :meth:`end_step` undo it.
        """

    @abc.abstractmethod
    def drop(self, rows: Sequence[int]) -> None:
        """Zeroes the rows of non-finite groups so they cannot leak into the combination."""

    @abc.abstractmethod
    def combine(self, weights: Tensor, *, scale: float = 1.0) -> None:
        """Writes ``scale · (ungrouped + Σ_k weights_k g_k)`` where the inner optimizer reads gradients."""

    @abc.abstractmethod
    def end_step(self) -> None:
        """Forgets the groups of this step (their rows are reused next step)."""

    @abc.abstractmethod
    def zero_grad(self, set_to_none: bool) -> None:
        """Clears the ungrouped gradients and any pending group gradients."""

    @abc.abstractmethod
    def extra_bytes(self) -> int:
        """Bytes held for group gradients beyond what ``.grad`` alone would need."""
