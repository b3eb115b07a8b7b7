"""The local backend: one flat ``[k, n]`` buffer per (device, dtype), ``.grad`` as row views.

While group ``name`` is captured, every trained parameter's ``.grad`` is a view into that
group's row, so autograd accumulates in place and nothing is copied. Outside group blocks the
``.grad`` of each parameter is a view into a separate flat ``base`` vector holding the ungrouped
gradient; at step time ``base += Aᵀ w`` (one GEMV per buffer) leaves the combined gradient
exactly where the inner optimizer reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .backend import Backend
from .errors import CaptureError

__all__ = ["FlatBuffer", "LocalBackend"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_GRAM_CHUNK = 1 << 20  # columns per float32 upcast chunk for low-precision Gram matrices


class TensorKind:
    """How a parameter's gradient is stored: plain tensors here; sharded backends (FSDP2) store a
    local shard wrapped in a distributed tensor and override both methods."""

    @staticmethod
    def local(tensor: Tensor) -> Tensor:
        """The part of ``tensor`` this process holds."""
        return tensor

    @staticmethod
    def wrap(param: Tensor, local_view: Tensor) -> Tensor:
        """A gradient for ``param`` whose local data is ``local_view``."""
        return local_view


def _same(a: Tensor | None, b: Tensor, kind: type[TensorKind]) -> bool:
    if a is b:
        return True
    if a is None:
        return False
    la, lb = kind.local(a), kind.local(b)
    return la.data_ptr() == lb.data_ptr() and la.shape == lb.shape and la.stride() == lb.stride()


class FlatBuffer:
    """Group rows and the ungrouped/combined row for parameters of one (device, dtype)."""

    def __init__(self, params: list[Tensor], kind: type[TensorKind] = TensorKind) -> None:
        self.params = params
        self.kind = kind
        self.locals = [kind.local(p) for p in params]
        self.device = self.locals[0].device
        self.dtype = self.locals[0].dtype
        self.numels = [t.numel() for t in self.locals]
        self.offsets = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.n = self.offsets[-1]
        self.rows: Tensor | None = None
        self.base: Tensor | None = None
        self._row_views: dict[int, list[Tensor]] = {}
        self._base_views: list[Tensor] | None = None

    def _views(self, flat: Tensor) -> list[Tensor]:
        spans = zip(self.params, self.locals, self.offsets[:-1], self.offsets[1:], strict=True)
        return [self.kind.wrap(p, flat[start:end].view_as(local)) for p, local, start, end in spans]

    def ensure_rows(self, count: int, used: int) -> None:
        """Grows the row buffer to hold ``count`` rows, keeping the first ``used`` rows."""
        if self.rows is not None and self.rows.shape[0] >= count:
            return
        rows = torch.empty((count, self.n), dtype=self.dtype, device=self.device)
        if self.rows is not None and used:
            rows[:used].copy_(self.rows[:used])
        self.rows = rows
        self._row_views = {}

    def row_views(self, i: int) -> list[Tensor]:
        if i not in self._row_views:
            assert self.rows is not None
            self._row_views[i] = self._views(self.rows[i])
        return self._row_views[i]

    def base_views(self) -> list[Tensor]:
        if self.base is None:
            self.base = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        if self._base_views is None:
            self._base_views = self._views(self.base)
        return self._base_views

    def adopt_ungrouped(self) -> None:
        """Moves each parameter's ungrouped ``.grad`` into ``base`` and points ``.grad`` at it."""
        for p, view in zip(self.params, self.base_views(), strict=True):
            grad = p.grad
            if _same(grad, view, self.kind):
                continue
            if grad is None:
                self.kind.local(view).zero_()
            else:
                self.kind.local(view).copy_(self.kind.local(grad))
            p.grad = view

    def point_at(self, views: list[Tensor]) -> None:
        for p, view in zip(self.params, views, strict=True):
            p.grad = view

    def drop_history(self) -> None:
        """``backward(create_graph=True)`` accumulates into ``.grad`` with autograd recording; the
        buffers then carry a graph. Group gradients are data here: keep the values, drop the graph."""
        if self.rows is not None and self.rows.requires_grad:
            self.rows = self.rows.detach()
            self._row_views = {}
        if self.base is not None and self.base.requires_grad:
            self.base = self.base.detach()
            self._base_views = None

    def collect(self, views: list[Tensor]) -> None:
        """After a group block: keeps gradients that autograd wrote out of place (``create_graph``)."""
        for p, view in zip(self.params, views, strict=True):
            grad = p.grad
            if _same(grad, view, self.kind):
                continue
            if grad is None:
                self.kind.local(view).zero_()
            else:
                self.kind.local(view).copy_(self.kind.local(grad))

    @torch.no_grad()
    def gram(self, m: int, columns: slice = slice(None)) -> Tensor:
        assert self.rows is not None
        a = self.rows[:m, columns]
        if self.dtype not in _LOW_PRECISION:
            return a @ a.T
        out = torch.zeros((m, m), dtype=torch.float32, device=self.device)
        for chunk in a.split(_GRAM_CHUNK, dim=1):
            c = chunk.float()
            out.addmm_(c, c.T)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_row_views"] = {}
        state["_base_views"] = None
        return state


class LocalBackend(Backend):
    """Group gradients of a single process.

    Args:
        optimizer: the inner optimizer; its ``param_groups`` are read at the start of every step
            so that ``add_param_group`` and reassigned groups are followed.
    """

    kind: type[TensorKind] = TensorKind

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self._buffers: list[FlatBuffer] = []
        self._layout: tuple[int, ...] = ()
        self._names: list[str] = []
        self._active: int | None = None
        self._adopted = False
        self._poison: tuple[Tensor, Tensor] | None = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def active(self) -> str | None:
        return None if self._active is None else self._names[self._active]

    @property
    def buffers(self) -> tuple[FlatBuffer, ...]:
        return tuple(self._buffers)

    @property
    def stats_device(self) -> torch.device:
        return self._buffers[0].device if self._buffers else torch.device("cpu")

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def _params(self) -> list[Tensor]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    # -- what distributed subclasses change ------------------------------------------------
    def _agree(self, event: str) -> None:
        """Distributed backends make every rank reach the same capture event (or all raise)."""

    def _columns(self, buf: FlatBuffer) -> slice:
        """The columns of ``buf`` whose Gram contribution this process computes."""
        return slice(None)

    def _reduce_gram(self, gram: Tensor) -> Tensor:
        """Sums the Gram contributions of all processes."""
        return gram

    def extra_bytes(self) -> int:
        return sum(b.rows.numel() * b.rows.element_size() for b in self._buffers if b.rows is not None)

    # -- layout ----------------------------------------------------------------------------
    def _sync_layout(self) -> None:
        params = [p for p in self._params() if p.requires_grad]
        layout = tuple(id(p) for p in params)
        if layout == self._layout and self._buffers:
            return
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            local = self.kind.local(p)
            by_key.setdefault((local.device, local.dtype), []).append(p)
        self._buffers = [FlatBuffer(ps, self.kind) for ps in by_key.values()]
        self._layout = layout
        self._adopted = False

    # -- capture ---------------------------------------------------------------------------
    @torch.no_grad()
    def enter(self, name: str) -> None:
        self._agree(f"enter group {name!r}")
        self._restore_poison()
        if not self._names:
            self._sync_layout()
        if name in self._names:
            row = self._names.index(name)
        else:
            row = len(self._names)
            for buf in self._buffers:
                buf.ensure_rows(row + 1, used=row)
                assert buf.rows is not None
                buf.rows[row].zero_()
            self._names.append(name)
        for buf in self._buffers:
            if not self._adopted:
                buf.adopt_ungrouped()
            buf.point_at(buf.row_views(row))
        self._adopted = True
        self._active = row

    @torch.no_grad()
    def exit(self) -> None:
        if self._active is None:
            raise CaptureError("exit() without a matching enter().")
        for buf in self._buffers:
            buf.collect(buf.row_views(self._active))
            buf.drop_history()
            buf.point_at(buf.base_views())
        self._active = None

    # -- statistics ------------------------------------------------------------------------
    def gram(self) -> Tensor:
        self._agree(f"step() with groups {self._names}")
        m = len(self._names)
        device = self.stats_device
        total = torch.zeros((m, m), dtype=torch.float64, device=device)
        for buf in self._buffers:
            total += buf.gram(m, self._columns(buf)).to(device=device, dtype=torch.float64)
        return self._reduce_gram(total)

    # -- combination -----------------------------------------------------------------------
    @torch.no_grad()
    def expose_ungrouped(self, poison: Tensor | None = None) -> None:
        for buf in self._buffers:
            buf.adopt_ungrouped()
        self._adopted = True
        if poison is not None and self._buffers and self._buffers[0].n:
            base = self._buffers[0].base
            assert base is not None
            first = base[:1]
            self._restore_poison()
            self._poison = (first, first.clone())
            first.add_(torch.where(poison.to(first.device), float("nan"), 0.0).to(first.dtype))

    def _restore_poison(self) -> None:
        if self._poison is not None:
            target, saved = self._poison
            target.copy_(saved)
            self._poison = None

    @torch.no_grad()
    def drop(self, rows: Sequence[int]) -> None:
        for buf in self._buffers:
            assert buf.rows is not None
            for r in rows:
                buf.rows[r].zero_()

    @torch.no_grad()
    def combine(self, weights: Tensor, *, scale: float = 1.0) -> None:
        self._restore_poison()
        m = len(self._names)
        if m == 0:
            if scale != 1.0:
                grads = [self.kind.local(p.grad) for p in self._params() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, scale)
            return
        for buf in self._buffers:
            buf.adopt_ungrouped()
            assert buf.rows is not None and buf.base is not None
            w = weights.to(device=buf.device, dtype=buf.dtype)
            buf.base.addmv_(buf.rows[:m].T, w, beta=scale, alpha=scale)
        self._adopted = True

    def end_step(self) -> None:
        self._restore_poison()
        self._names = []
        self._active = None
        self._adopted = False

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool) -> None:
        self._restore_poison()
        self._names = []
        self._adopted = False
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()
