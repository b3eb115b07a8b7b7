"""The local backend: group gradients of one process in flat ``[k, n]`` buffers.

Inside ``with opt.group(name)`` the backward passes' gradients go to ``name``'s row of one flat
buffer per (device, dtype) (:mod:`balancer.flat_buffer`); the ungrouped gradients are set aside
and restored when the block ends. At step time one Gram product and one GEMV per buffer turn
the rows into ``ungrouped + Σ_k w_k g_k``, written where the inner optimizer reads ``.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backend import Backend, NaNFlag
from .errors import CaptureError
from .flat_buffer import FlatBuffer, TensorKind

__all__ = ["FlatBuffer", "LocalBackend", "TensorKind"]


class LocalBackend(Backend):
    """Group gradients of a single process.

    Args:
        optimizer: the inner optimizer; its ``param_groups`` are read at the start of every step
            so that ``add_param_group`` and reassigned groups are followed.
    """

    kind: type[TensorKind] = TensorKind

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self._optimizer = optimizer
        self._buffers: list[FlatBuffer] = []
        self._layout: tuple[int, ...] = ()
        self._fresh = False
        self._poison = NaNFlag()
        self._reserved_rows = 0

    def reserve_rows(self, count: int) -> None:
        self._reserved_rows = max(self._reserved_rows, count)

    # -- queries ---------------------------------------------------------------------------
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

    def extra_bytes(self) -> int:
        return sum(buf.nbytes() for buf in self._buffers)

    # -- what distributed subclasses change ------------------------------------------------
    def _agree(self, event: str) -> None:
        """Distributed backends make every rank reach the same capture event (or all raise)."""

    def _columns(self, buf: FlatBuffer) -> slice:
        """The columns of ``buf`` whose Gram contribution this process computes."""
        return slice(None)

    def _reduce_gram(self, gram: Tensor) -> Tensor:
        """Sums the Gram contributions of all processes."""
        return gram

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

    # -- capture ---------------------------------------------------------------------------
    @torch.no_grad()
    def enter(self, name: str) -> None:
        self._agree(f"enter group {name!r}")
        self._poison.restore()
        if not self._names:
            self._sync_layout()
        self._fresh = name not in self._names
        if self._fresh:
            self._names.append(name)
            for buf in self._buffers:
                buf.ensure_rows(max(len(self._names), self._reserved_rows))
        row = self._names.index(name)
        for buf in self._buffers:
            buf.begin_group(row, self._fresh)
        self._active = row

    @torch.no_grad()
    def exit(self) -> None:
        if self._active is None:
            raise CaptureError("exit() without a matching enter().")
        for buf in self._buffers:
            buf.end_group(self._active, self._fresh)
        self._active = None

    # -- statistics ------------------------------------------------------------------------
    @torch.no_grad()
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
        if poison is not None and self._buffers and self._buffers[0].n:
            base = self._buffers[0].base
            assert base is not None
            self._poison.plant(base[:1], poison)

    @torch.no_grad()
    def drop(self, rows: Sequence[int]) -> None:
        for buf in self._buffers:
            for r in rows:
                buf.row(r).zero_()

    @torch.no_grad()
    def combine(self, weights: Tensor, *, scale: float = 1.0) -> None:
        self._poison.restore()
        m = len(self._names)
        if m == 0:
            if scale != 1.0:
                grads = [self.kind.local(p.grad) for p in self._params() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, scale)
            return
        for buf in self._buffers:
            buf.combine(m, weights, scale)

    def _clear(self) -> None:
        self._poison.restore()
        self._names = []
        self._active = None
        for buf in self._buffers:
            buf.consolidate()

    def end_step(self) -> None:
        self._clear()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool) -> None:
        self._clear()
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()
