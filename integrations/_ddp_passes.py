"""Rank agreement on the passes in which DDP communicates: every backward pass, and forwards that communicate.

:class:`~._agreement.RankAgreement` checks the capture events the Balancer drives (entering a
group, stepping). DDP also runs collectives of its own, where the Balancer does not look:

- a backward pass after a synchronizing forward launches one all-reduce per gradient bucket, from
  post-hooks on the parameters' ``AccumulateGrad`` nodes (none after a forward under ``no_sync()``);
- a forward broadcasts the module buffers (``broadcast_buffers=True`` and the model has buffers)
  and, once, rebuilds the buckets after the first synchronized backward pass.

A rank that runs a pass the others do not (an extra micro-batch in a group, a group block left by
an exception before its backward) sends that collective into the others' next agreement
all-reduce: gloo aborts the process, NCCL hangs. :class:`PassChecks` makes these passes capture
events too, each checked before DDP's first collective in it, so that every rank raises
:class:`~balancer.errors.GroupMismatchError` instead:

- **backward**: a tensor hook on every trained or DDP-managed parameter. On a leaf,
  ``param.register_hook`` is a pre-hook of its ``AccumulateGrad`` node: it runs before DDP's
  post-hook on that node, so the first one of a pass runs before any bucket is complete. It checks
  ``"backward i of group 'g' (synchronized by DDP)"`` (``i`` counts the group's backward passes this
  step; ``"outside any group"`` for ungrouped ones); the later hooks of the pass see the same
  autograd graph task id and return at once. The graph task id, unlike an end-of-pass callback,
  leaves nothing stale when an error aborts the pass. Whether DDP synchronizes a pass is decided
  at forward time (grad mode on, not under ``no_sync()``) and used up by the next backward pass: a
  forward hook on the DDP module mirrors this, so an extra ``no_sync`` pass on one rank cannot agree
  with a synchronized pass on another (whose bucket all-reduce would then meet a check).
- **forward**: a forward pre-hook on the DDP module checks ``"forward i of group 'g'"`` before
  ``DDP.forward`` runs, when that forward may communicate (buffers to broadcast, buckets not rebuilt
  yet). Forwards that do not communicate are not checked and cost nothing.
- DDP modules holding trained parameters are found by a module-global forward pre-hook, which
  lives only until they cover the trained parameters or the first step ends.

Enter and step events carry a tally of the step's backward passes (:meth:`PassChecks.tally`), so a
mismatch reads as what each rank did. Hooks hold this object weakly and are removed when it is
collected: a Balancer that is gone checks nothing. Cost: one all-reduce of two ``int64`` per
backward pass (2 CPU ranks over gloo: about 0.15 ms alone, 0.3 to 1 ms added to a pass with the
wait for the slower rank), about 1 µs per parameter tensor for the hooks, and per forward an
all-reduce only where DDP communicates anyway. Not covered: passes that reach no parameter known
to DDP or the Balancer (DDP does not communicate in them either), and DDP's ``Join`` context for
uneven inputs, whose ranks run different passes on purpose.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from ._agreement import RankAgreement

__all__ = ["PassChecks"]

_Ref = weakref.ReferenceType["PassChecks"]


class Captures(Protocol):
    """What the checks read from the backend they serve."""

    @property
    def active(self) -> str | None:
        """The group being captured, or ``None``."""

    def trained_parameters(self) -> list[Tensor]:
        """The parameters whose gradients the Balancer captures."""


def _where(group: str | None) -> str:
    return "outside any group" if group is None else f"of group {group!r}"


def _may_communicate(ddp: DistributedDataParallel) -> bool:
    """Whether the forward ``ddp`` is about to run may broadcast buffers or rebuild its buckets."""
    rebuild = (
        torch.is_grad_enabled()
        and not getattr(ddp, "_has_rebuilt_buckets", False)
        and (getattr(ddp, "static_graph", False) or not getattr(ddp, "find_unused_parameters", False))
    )
    return bool(rebuild or getattr(ddp, "will_sync_module_buffers", lambda: True)())


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


# Module-level hook functions bound to a weak reference: a hook must not keep the checks alive.
def _on_grad(ref: _Ref, grad: Tensor) -> None:
    checks = ref()
    if checks is not None:
        checks.before_backward()


def _on_any_forward(ref: _Ref, module: torch.nn.Module, args: Any) -> None:
    checks = ref()
    if checks is not None and isinstance(module, DistributedDataParallel):
        checks.adopt(module)


def _on_ddp_forward(ref: _Ref, ddp: DistributedDataParallel, args: Any) -> None:
    checks = ref()
    if checks is not None:
        checks.before_forward(ddp)


def _after_ddp_forward(ref: _Ref, ddp: DistributedDataParallel, args: Any, output: Any) -> None:
    checks = ref()
    if checks is not None and torch.is_grad_enabled() and ddp.require_backward_grad_sync:
        checks.armed = True  # DDP.forward called prepare_for_backward: its next backward pass all-reduces


class PassChecks:
    """Checks every DDP backward pass, and every DDP forward that communicates, across the ranks.

    Args:
        backend: the backend served, held weakly; its active group names the passes.
        agreement: the rank agreement of that backend.
    """

    def __init__(self, backend: Captures, agreement: RankAgreement) -> None:
        self._backend = weakref.ref(backend)
        self._agreement = agreement
        self._backward: dict[str | None, int] = {}  # backward passes of this step, by group
        self._forward: dict[str | None, int] = {}  # checked forwards of this step, by group
        self._pass = -1  # autograd graph task id of the last backward pass checked
        self.armed = False  # a DDP forward asked for a synchronized backward pass that has not run yet
        self._hooked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._ddps: weakref.WeakSet[DistributedDataParallel] = weakref.WeakSet()
        self._unrelated: weakref.WeakSet[DistributedDataParallel] = weakref.WeakSet()
        self._handles: list[RemovableHandle] = []
        self._discovery: RemovableHandle | None = register_module_forward_pre_hook(partial(_on_any_forward, self._ref))
        self._handles.append(self._discovery)
        weakref.finalize(self, _remove, self._handles)
        self.hook(backend.trained_parameters())

    @property
    def _ref(self) -> _Ref:
        return weakref.ref(self)

    def hook(self, params: Iterable[Tensor]) -> None:
        """Hooks the parameters that need a gradient and have no hook yet (param groups may grow)."""
        for p in params:
            if p.requires_grad and p not in self._hooked:
                self._hooked[p] = None
                self._handles.append(p.register_hook(partial(_on_grad, self._ref)))

    def adopt(self, module: DistributedDataParallel) -> None:
        """Hooks a DDP module about to run its forward, if it holds trained parameters."""
        backend = self._backend()
        if backend is None or module in self._ddps or module in self._unrelated:
            return
        trained = {id(p) for p in backend.trained_parameters()}
        params = list(module.module.parameters())
        if not any(id(p) in trained for p in params):
            self._unrelated.add(module)  # another model's DDP (a reward model, a critic): not ours to check
            return
        self._ddps.add(module)
        self._handles.append(module.register_forward_pre_hook(partial(_on_ddp_forward, self._ref)))
        self._handles.append(module.register_forward_hook(partial(_after_ddp_forward, self._ref)))
        self.hook(params)
        self.before_forward(module)  # the pre-hook just registered runs from the next call on
        if trained <= {id(p) for ddp in self._ddps for p in ddp.module.parameters()}:
            self.stop_discovery()

    def stop_discovery(self) -> None:
        """Removes the module-global forward hook that finds DDP modules."""
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None

    def before_forward(self, ddp: DistributedDataParallel) -> None:
        """Checks a DDP forward before it broadcasts buffers or rebuilds buckets."""
        backend = self._backend()
        if backend is None or not _may_communicate(ddp):
            return
        group = backend.active
        index = self._forward.get(group, 0)
        self._agreement.check(f"forward {index} {_where(group)}")
        self._forward[group] = index + 1

    def before_backward(self) -> None:
        """Checks a backward pass at its first parameter gradient, before DDP's first bucket all-reduce."""
        task = torch._C._current_graph_task_id()
        if task == self._pass:
            return
        backend = self._backend()
        if backend is None:
            return
        group = backend.active
        index = self._backward.get(group, 0)
        how = "synchronized by DDP" if self.armed else "not synchronized, as under no_sync()"
        self._agreement.check(f"backward {index} {_where(group)} ({how})")
        self._pass = task
        self._backward[group] = index + 1
        self.armed = False

    def tally(self) -> str:
        """The backward passes of this step, by group: ``"backward passes this step: 'a' 2, ungrouped 1"``."""
        if not self._backward:
            return "no backward pass this step"
        counts = ", ".join(f"{'ungrouped' if g is None else repr(g)} {n}" for g, n in self._backward.items())
        return f"backward passes this step: {counts}"

    def reset(self) -> None:
        """Forgets the passes of the step (``zero_grad``, end of step); DDP's pending synchronization stays."""
        self._backward.clear()
        self._forward.clear()
