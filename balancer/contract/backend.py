"""The backend seam: where group gradients live and how their statistics are reduced.

The :class:`~balancer.Balancer` core only talks to a :class:`Backend`. The local backend
(:mod:`balancer.capture.local`) keeps one flat ``[k, n]`` buffer per (device, dtype); distributed
backends (DDP, FSDP2, DeepSpeed ZeRO, in ``balancer.integrations``) keep each rank's share of
the reduced group gradients and add one all-reduce of the packed Gram matrix.

The step protocol, as the core drives it::

    backend.enter(name) ... backward ... backend.exit()      # any number of times, any order
    gram = backend.gram()           # [k, k] float64, global, on backend.stats_device
                                    # (ungrouped=True: [k+1, k+1], the ungrouped gradient last)
    gram = backend.refine_gram(gram, rows)  # only for rows whose fast statistics are not trustworthy
    backend.drop(rows)              # only when some groups were non-finite
    backend.combine(weights, ...)   # Σ_k w_k g_k (+ ungrouped) where the inner optimizer reads it
                                    # (rule=...: a combine rule, coordinate-wise, instead of the sum)
    backend.optimizer_step(closure)     # inner.step(), or engine.step() for DeepSpeed
    backend.end_step()              # or, if anything after combine() failed: backend.revert()

A step is all or nothing: ``combine`` never writes the group rows, and ``revert`` puts ``.grad``
and the ungrouped gradient back as they were, so a failed step can be retried.

From ``gram`` on, the step drives a backend only through the narrower
:class:`~balancer.capture.source.CaptureSource` protocol, which the layer capture
(``backward_samples``/``backward_tasks``) implements too.

A backend is chosen from what ``Balancer(...)`` is given: integrations implement the hook
``balancer_make_backend(target)``; a plain ``torch.optim.Optimizer`` that no integration claims
gets the :class:`~balancer.capture.local.LocalBackend`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from balancer.contract.combine import BoundRule

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

    ungrouped_gram: bool = False
    """Whether :meth:`gram` can include the ungrouped gradient (``ungrouped=True``); backends that
    cannot are clipped from the combined update instead (:meth:`update_norm`)."""

    @abc.abstractmethod
    def gram(self, *, ungrouped: bool = False) -> Tensor:
        """The exact global ``[k, k]`` float64 Gram matrix of the present groups.

        ``ungrouped=True`` (only where :attr:`ungrouped_gram`): ``[k+1, k+1]``, index ``k`` the
        ungrouped gradient (zeros when there is none), for the norm of the update.
        """

    @property
    def gram_floor(self) -> float:
        """Diagonal entries of :meth:`gram` below this may have lost precision to underflow (the
        fast path works in the gradients' dtype); the step then asks :meth:`refine_gram`."""
        return 0.0

    def refine_gram(self, gram: Tensor, rows: Sequence[int]) -> Tensor:
        """``gram`` with the entries of ``rows`` made trustworthy: a finite row never gives a
        non-finite or underflowed entry (overflow above ~1e19, underflow below ~1e-19 in float32).
        ``rows`` index ``gram`` (the ungrouped gradient is the last index when it is included).
        Every rank calls it at the same point. The default returns ``gram`` unchanged."""
        return gram

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

    combine_rules: bool = False
    """Whether :meth:`combine` takes a combine rule (:mod:`balancer.contract.combine`): only backends
    that hold group rows, column by column, with their global coordinate index."""

    @abc.abstractmethod
    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0, rule: BoundRule | None = None) -> None:
        """Writes ``scale · (ungrouped + Σ_k weights_k g_k)`` where the inner optimizer reads gradients.

        ``scale`` may be a 0-d tensor (a clip coefficient, never read on the host). The group
        rows are not written, so :meth:`revert` can undo it. With a ``rule`` (only where
        :attr:`combine_rules`), ``scale · ungrouped + rule(scale · w ∘ rows)`` coordinate-wise instead.
        """

    def revert(self) -> None:
        """Undoes this step's :meth:`combine` (and any move of the ungrouped gradient): ``.grad``
        and the ungrouped gradient are as before, the groups still pending. Default: nothing to undo."""

    def update_norm(self, norm_type: float) -> Tensor:
        """The global ``norm_type``-norm (0-d float64) of what :meth:`combine` wrote (of the
        ungrouped gradient when no group is pending). Backends that cannot raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} computes update norms only from the Gram matrix (L2).")

    def scale_update(self, factor: Tensor) -> None:
        """Multiplies what :meth:`combine` wrote (the ungrouped gradient when no group is pending) by ``factor``."""
        raise NotImplementedError(f"{type(self).__name__} clips only through combine().")

    def capture_token(self) -> Any:
        """A value that changes when a backward pass adds to the ungrouped gradient (``None``: not
        tracked). Lets the step refuse gradients added after ``clip_grad_norm_`` measured them."""
        return None

    def framework_clipping(self) -> float | None:
        """The max norm to which the framework itself clips the combined update (DeepSpeed's
        ``gradient_clipping``), or ``None``."""
        return None

    @abc.abstractmethod
    def end_step(self) -> None:
        """Forgets the groups of this step (their rows are reused next step)."""

    @abc.abstractmethod
    def zero_grad(self, set_to_none: bool) -> None:
        """Clears the ungrouped gradients and any pending group gradients."""

    @abc.abstractmethod
    def extra_bytes(self) -> int:
        """Bytes held for group gradients beyond what ``.grad`` alone would need."""
