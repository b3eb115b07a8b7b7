"""The local backend: group gradients of one process in flat ``[k, n]`` buffers.

Inside ``with opt.group(name)`` the backward passes' gradients go to ``name``'s row of one flat
buffer per (device, dtype) (:mod:`balancer.capture.flat_buffer`); the ungrouped gradients are set aside
and restored when the block ends. At step time one Gram product and one GEMV per buffer turn
the rows into ``ungrouped + Σ_k w_k g_k``, written where the inner optimizer reads ``.grad``.

Refused at capture, each with a :class:`~balancer.errors.CaptureError` that leaves the Balancer
usable: a parameter listed twice in the inner optimizer (it would be stepped twice or, in the
rows, never), a parameter whose ``requires_grad`` was turned on between two groups of one step
(its gradient would bypass the groups), and sparse gradients inside a group
(``nn.Embedding(sparse=True)``; an ungrouped sparse gradient is made dense in the update).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from balancer.capture.flat_buffer import FlatBuffer, TensorKind
from balancer.capture.row_gram import rows_to_rescale, with_rows
from balancer.capture.rule_combine import combine_by_rule, rule_tables
from balancer.contract.backend import Backend, NaNFlag
from balancer.contract.combine import BoundRule
from balancer.errors import BalancerWarning, CaptureError

__all__ = ["FlatBuffer", "LocalBackend", "TensorKind"]

_UNDERFLOW_MARGIN = 1e6  # a Gram diagonal this many times above n·tiny keeps 1e-6 relative accuracy


def check_unique_params(optimizer: torch.optim.Optimizer) -> None:
    """Refuses a parameter listed twice in ``optimizer.param_groups``, naming both places."""
    seen: dict[int, str] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            where = f"param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)})"
            if id(p) in seen:
                raise CaptureError(
                    f"A parameter is listed twice in the inner optimizer: {seen[id(p)]} and {where}. The Balancer "
                    "keeps one gradient per parameter, so it would be stepped twice or never. List each parameter "
                    "once (e.g. deduplicate with `list(dict.fromkeys(params))`)."
                )
            seen[id(p)] = where


class LocalBackend(Backend):
    """Group gradients of a single process.

    Args:
        optimizer: the inner optimizer; its ``param_groups`` are read at the start of every step
            so that ``add_param_group`` and reassigned groups are followed.
    """

    kind: type[TensorKind] = TensorKind
    ungrouped_gram = True
    combine_rules = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        check_unique_params(optimizer)
        self._optimizer = optimizer
        self._buffers: list[FlatBuffer] = []
        self._layout: tuple[int, ...] = ()
        self._fresh = False
        self._poison = NaNFlag()
        self._reserved_rows = 0
        self._undo_grads: list[tuple[Tensor, Tensor | None]] | None = None  # combine() without groups
        self._tables: tuple[Any, list[tuple[Tensor, Tensor]]] | None = None  # for combine rules

    def reserve_rows(self, count: int) -> None:
        self._reserved_rows = max(self._reserved_rows, count)

    # -- queries ---------------------------------------------------------------------------
    @property
    def buffers(self) -> tuple[FlatBuffer, ...]:
        return tuple(self._buffers)

    @property
    def stats_device(self) -> torch.device:
        if self._buffers:
            return self._buffers[0].device
        params = self._params()  # no group captured yet: the device of the gradients there are
        return self.kind.local(params[0]).device if params else torch.device("cpu")

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def _params(self) -> list[Tensor]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def extra_bytes(self) -> int:
        return sum(buf.nbytes() for buf in self._buffers)

    @property
    def gram_floor(self) -> float:
        floor = 0.0
        for buf in self._buffers:
            work = torch.float32 if buf.dtype in (torch.float16, torch.bfloat16) else buf.dtype
            floor += buf.n * (2 if buf.dtype.is_complex else 1) * torch.finfo(work).tiny * _UNDERFLOW_MARGIN
        return floor

    # -- what distributed subclasses change ------------------------------------------------
    def _agree(self, event: str) -> None:
        """Distributed backends make every rank reach the same capture event (or all raise)."""

    def _columns(self, buf: FlatBuffer) -> slice:
        """The columns of ``buf`` whose Gram contribution this process computes."""
        return slice(None)

    def _reduce_gram(self, gram: Tensor) -> Tensor:
        """Sums the Gram contributions of all processes."""
        return gram

    def _reduce_norm(self, norm: Tensor, norm_type: float) -> Tensor:
        """The global norm from this process's norm of its local gradients (replicated: itself)."""
        return norm

    # -- layout ----------------------------------------------------------------------------
    def _trained(self) -> list[Tensor]:
        return [p for p in self._params() if p.requires_grad]

    def _sync_layout(self) -> None:
        params = self._trained()
        layout = tuple(id(p) for p in params)
        if layout == self._layout and self._buffers:
            return
        check_unique_params(self._optimizer)
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            local = self.kind.local(p)
            by_key.setdefault((local.device, local.dtype), []).append(p)
        self._buffers = [FlatBuffer(ps, self.kind) for ps in by_key.values()]
        self._layout = layout

    def _check_layout(self, event: str) -> None:
        """Refuses a parameter that started to require grad after the step's first group: its
        gradient would land outside every row and bypass the balancing."""
        known = {id(p) for buf in self._buffers for p in buf.params}  # objects, not the ids cached in _layout
        new = [(i, tuple(p.shape)) for i, p in enumerate(self._params()) if p.requires_grad and id(p) not in known]
        if new:
            raise CaptureError(
                f"{event}: {len(new)} parameter(s) started to require grad after the first group of this step "
                f"(optimizer parameter index and shape: {new[:5]}). Their gradients would bypass the groups. "
                "Change requires_grad between steps (after step() or zero_grad()), not between groups."
            )

    # -- capture ---------------------------------------------------------------------------
    @torch.no_grad()
    def enter(self, name: str) -> None:
        if self._names:
            self._check_layout(f"Entering group {name!r}")
        self._agree(f"enter group {name!r}")
        self._poison.restore()
        if not self._names:
            self._sync_layout()
        self._fresh = name not in self._names
        if self._fresh:
            self._names.append(name)
            self._ensure_rows()
        row = self._names.index(name)
        for buf in self._buffers:
            buf.begin_group(row, self._fresh)
        self._active = row

    def _ensure_rows(self) -> None:
        """Room for this step's rows; a reservation from a checkpoint that does not fit in memory is
        dropped with a warning (it only makes the first resumed steps sum in the long run's order)."""
        try:
            for buf in self._buffers:
                buf.ensure_rows(max(len(self._names), self._reserved_rows))
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if self._reserved_rows <= len(self._names):
                raise
            warnings.warn(
                f"The checkpoint's hint to reserve {self._reserved_rows} group rows could not be honoured "
                f"({type(exc).__name__}: {str(exc)[:120]}); rows are made as groups appear instead. Only the "
                "last bits of the first resumed steps may differ from the uninterrupted run.",
                BalancerWarning,
                stacklevel=5,
            )
            self._reserved_rows = 0
            for buf in self._buffers:
                buf.ensure_rows(len(self._names))

    @torch.no_grad()
    def exit(self) -> None:
        if self._active is None:
            raise CaptureError("exit() without a matching enter().")
        sparse = [
            (_grad(buf.params[j]).layout, tuple(buf.params[j].shape)) for buf in self._buffers for j in buf.not_dense()
        ]
        if sparse:
            name = self._names[self._active]
            for buf in self._buffers:
                buf.abandon_group()
            if self._fresh:
                self._names.pop()
            self._active = None
            layout, shape = sparse[0]
            raise CaptureError(
                f"Group {name!r} received a sparse gradient ({layout}) for a parameter of shape {shape}, "
                "e.g. from nn.Embedding(sparse=True). Group "
                "gradients are dense rows: use sparse=False for layers trained inside groups. Nothing of this "
                "block was kept; the groups captured before it are still pending."
            )
        for buf in self._buffers:
            buf.end_group(self._active, self._fresh)
        self._active = None

    def capture_token(self) -> Any:
        return tuple(None if p.grad is None else (id(p.grad), self.kind.local(p.grad)._version) for p in self._params())

    # -- statistics ------------------------------------------------------------------------
    @torch.no_grad()
    def gram(self, *, ungrouped: bool = False) -> Tensor:
        self._poison.restore()  # a NaN planted for the GradScaler must not reach the statistics
        if self._names:
            self._check_layout("step()")
        self._agree(f"step() with groups {self._names}")
        return self._global_gram(ungrouped)

    def _global_gram(self, ungrouped: bool) -> Tensor:
        m = len(self._names)
        size = m + (1 if ungrouped else 0)
        device = self.stats_device
        total = torch.zeros((size, size), dtype=torch.float64, device=device)
        for buf in self._buffers:
            total += buf.gram(m, self._columns(buf), with_base=ungrouped).to(device=device, dtype=torch.float64)
        return self._reduce_gram(total)

    @torch.no_grad()
    def refine_gram(self, gram: Tensor, rows: Sequence[int]) -> Tensor:
        """Rows that are exactly zero are right already (their entries are exact zeros), and rows
        holding NaN/inf are non-finite indeed; for the others (finite, nonzero, overflowed or
        underflowed in the fast path) the entries are recomputed from the row scaled by its
        largest magnitude (:func:`~balancer.capture.flat_buffer.rescaled_entries`): one more pass over the
        rows, on those rare steps only."""
        m = len(self._names)
        ungrouped = gram.shape[0] == m + 1
        device = self.stats_device
        rows = list(rows)
        amax = torch.zeros(len(rows), dtype=torch.float64, device=device)
        for buf in self._buffers:
            amax = torch.maximum(amax, buf.amax(rows, m, self._columns(buf)).to(device).nan_to_num(torch.inf))
        redo = rows_to_rescale(rows, self.all_reduce(amax, "max"))
        if not redo:
            return gram
        entries = torch.zeros((len(redo), gram.shape[0]), dtype=torch.float64, device=device)
        for buf in self._buffers:
            entries += buf.rescaled_entries(m, redo, self._columns(buf), ungrouped).to(device)
        return with_rows(gram, redo, self._reduce_gram(entries))

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
    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0, rule: BoundRule | None = None) -> None:
        self._poison.restore()
        m = len(self._names)
        if m:
            tables = self._rule_tables() if rule is not None else []
            for i, buf in enumerate(self._buffers):
                if rule is None:
                    buf.combine(m, weights, scale)
                else:
                    combine_by_rule(buf, m, weights, scale, rule, tables[i])
        elif isinstance(scale, Tensor) or scale != 1.0:
            self._scale_ungrouped(scale)

    def _rule_tables(self) -> list[tuple[Tensor, Tensor]]:
        """Where each buffer's columns lie in the coordinates' global index (:func:`rule_tables`)."""
        key = (self._layout, tuple(id(p) for p in self._params()))
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, rule_tables(self._buffers, self._params(), self._shard_start))
        return self._tables[1]

    def _shard_start(self, param: Tensor) -> int:
        """The global flat index, within ``param``, of the first element this process holds (0 when it
        holds the whole parameter); sharded backends override it."""
        return 0

    def _scale_ungrouped(self, factor: float | Tensor) -> None:
        """No group pending: ``.grad *= factor``, out of place the first time so it can be reverted."""
        if self._undo_grads is None:
            self._undo_grads = [(p, p.grad) for p in self._params()]
            for p in self._params():
                if p.grad is not None:
                    p.grad = p.grad * (factor.to(p.grad.device) if isinstance(factor, Tensor) else factor)
            return
        grads = [self.kind.local(p.grad) for p in self._params() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device) if isinstance(factor, Tensor) else factor)

    @torch.no_grad()
    def update_norm(self, norm_type: float) -> Tensor:
        if self._names:
            parts = [buf.base for buf in self._buffers if buf.base is not None]
        else:
            parts = [self.kind.local(p.grad).reshape(-1) for p in self._params() if p.grad is not None]
        device = self.stats_device
        if not parts:
            return self._reduce_norm(torch.zeros((), dtype=torch.float64, device=device), norm_type)
        norms = torch.stack([torch.linalg.vector_norm(t, norm_type).to(device, torch.float64) for t in parts])
        return self._reduce_norm(torch.linalg.vector_norm(norms, norm_type), norm_type)

    @torch.no_grad()
    def scale_update(self, factor: Tensor) -> None:
        if not self._names:
            self._scale_ungrouped(factor)
            return
        for buf in self._buffers:
            if buf.base is not None:
                buf.base.mul_(factor.to(device=buf.device, dtype=buf.base.real.dtype))

    def revert(self) -> None:
        self._poison.restore()
        for buf in self._buffers:
            buf.revert()
        if self._undo_grads is not None:
            for p, grad in self._undo_grads:
                p.grad = grad
            self._undo_grads = None

    def _clear(self) -> None:
        self._poison.restore()
        self._names = []
        self._active = None
        self._undo_grads = None
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


def _grad(param: Tensor) -> Tensor:
    """``param.grad`` where the caller knows it is set (a parameter that received a gradient)."""
    assert param.grad is not None
    return param.grad
