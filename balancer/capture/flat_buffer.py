"""``FlatBuffer``: the group rows and the update row of the parameters of one (device, dtype).

Layout: one contiguous block ``[1 + capacity, n]``. Row 0 is ``base``: it holds the ungrouped
gradient while groups are captured, then ``ungrouped + Σ_k w_k g_k``, and every parameter's
``.grad`` is a view into it, exactly where the inner optimizer reads. Group ``i`` lives in row
``1 + i``. Keeping ``base`` right before the group rows makes ``[base; g_1 … g_m]`` one contiguous
matrix, so the Gram matrix *with* the cross terms ``⟨ungrouped, g_k⟩`` (what the norm of the
update needs, see :mod:`balancer.step.clip`) is the same single GEMM as the Gram matrix alone.

When a new group appears mid-step its row gets a block of its own (nothing captured is copied);
the Gram matrix and the combination then read the blocks tile by tile, a few columns of every
block gathered into a small scratch matrix, so ``k`` blocks cost the same passes as one; the
blocks are merged into one at the end of the step.

Complex parameters are statistics over their real and imaginary parts (``view_as_real``): the
inner product of two complex gradients is ``Re Σ a·conj(b)``, the one their norms come from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from balancer.capture.row_gram import abs_max, column_tiles, rescaled_entries, stacked_gram

__all__ = ["FlatBuffer", "TensorKind"]


def _base_last(t: Tensor, *dims: int) -> Tensor:
    """``t`` with index 0 of each of ``dims`` (the base row, stored first) moved to the end."""
    for dim in dims:
        t = torch.cat([t.narrow(dim, 1, t.shape[dim] - 1), t.narrow(dim, 0, 1)], dim=dim)
    return t


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


class FlatBuffer:
    """The update row (``base``) and the group rows for parameters of one (device, dtype)."""

    def __init__(self, params: list[Tensor], kind: type[TensorKind] = TensorKind) -> None:
        self.params = params
        self.kind = kind
        self.locals = [kind.local(p) for p in params]
        self.device = self.locals[0].device
        self.dtype = self.locals[0].dtype
        self.offsets = [0]
        for t in self.locals:
            self.offsets.append(self.offsets[-1] + t.numel())
        self.n = self.offsets[-1]
        self.blocks: list[Tensor] = []  # blocks[0][0] is base; then the group rows, in order
        self.saved: list[Tensor | None] = []
        self._row_views: dict[int, list[Tensor]] = {}
        self._base_views: list[Tensor] | None = None
        self._undo: tuple[list[Tensor | None], Tensor | None] | None = None

    # -- storage ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Group rows held (the base row excluded)."""
        return sum(block.shape[0] for block in self.blocks) - (1 if self.blocks else 0)

    def nbytes(self) -> int:
        """Bytes of the group rows (the base row replaces the ``.grad`` storage: not extra)."""
        return self.capacity * self.n * self.blocks[0].element_size() if self.blocks else 0

    @property
    def base(self) -> Tensor | None:
        return self.blocks[0][0] if self.blocks else None

    def ensure_rows(self, count: int) -> None:
        """Makes room for ``count`` group rows; new rows get a block of their own (nothing is copied)."""
        if not self.blocks:
            self.blocks.append(torch.empty((1 + count, self.n), dtype=self.dtype, device=self.device))
            return
        missing = count - self.capacity
        if missing > 0:
            self.blocks.append(torch.empty((missing, self.n), dtype=self.dtype, device=self.device))

    def consolidate(self) -> None:
        """Between steps: one contiguous block with room for every row (the group rows are spent;
        ``base`` keeps the update, which ``.grad`` shows until ``zero_grad``)."""
        self._undo = None
        if len(self.blocks) <= 1:
            return
        capacity = self.capacity
        base_views = self.base_views()
        on_base = [self.same(p.grad, view) for p, view in zip(self.params, base_views, strict=True)]
        update = self.blocks[0][0].clone()
        for p, used in zip(self.params, on_base, strict=True):
            if used:
                p.grad = None  # no reference may keep the old blocks alive: 2·k·n at the peak otherwise
        self.blocks, self._row_views, self._base_views = [], {}, None
        self.blocks = [torch.empty((1 + capacity, self.n), dtype=self.dtype, device=self.device)]
        self.blocks[0][0].copy_(update)
        del update
        for p, view, used in zip(self.params, self.base_views(), on_base, strict=True):
            if used:
                p.grad = view

    def parts(self, m: int, with_base: bool = False) -> list[Tensor]:
        """Row blocks covering ``[base;] g_1 … g_m`` in order (views, one per storage block)."""
        out = [self.blocks[0][(0 if with_base else 1) : 1 + m]]
        start = self.blocks[0].shape[0] - 1
        for block in self.blocks[1:]:
            if start >= m:
                break
            out.append(block[: m - start])
            start += block.shape[0]
        return [p for p in out if p.shape[0]]

    def row(self, i: int) -> Tensor:
        """Group ``i``'s row."""
        start = 0
        for j, block in enumerate(self.blocks):
            rows = block.shape[0] - (1 if j == 0 else 0)
            if i < start + rows:
                return block[i - start + (1 if j == 0 else 0)]
            start += rows
        raise IndexError(i)

    def _views(self, flat: Tensor) -> list[Tensor]:
        spans = zip(self.params, self.locals, self.offsets[:-1], self.offsets[1:], strict=True)
        return [self.kind.wrap(p, flat[start:end].view_as(local)) for p, local, start, end in spans]

    def row_views(self, i: int) -> list[Tensor]:
        if i not in self._row_views:
            self._row_views[i] = self._views(self.row(i))
        return self._row_views[i]

    def base_views(self) -> list[Tensor]:
        if self._base_views is None:
            assert self.blocks, "base_views() before the first group row was made"
            self._base_views = self._views(self.blocks[0][0])
        return self._base_views

    # -- capture ---------------------------------------------------------------------------
    def same(self, grad: Tensor | None, view: Tensor) -> bool:
        if grad is view:
            return True
        if grad is None:
            return False
        a, b = self.kind.local(grad), self.kind.local(view)
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()

    def begin_group(self, i: int, fresh: bool) -> None:
        """Sets ``.grad`` for capturing row ``i``, keeping the ungrouped gradients aside.

        A fresh row (first capture of the group in this step) starts with ``.grad = None``: the
        first backward then hands over its gradient without an add, and :meth:`end_group` copies
        it into the row, which is cheaper than zeroing the row and accumulating into it. Later
        captures of the group accumulate straight into the row's views.
        """
        self.saved = [p.grad for p in self.params]
        views = None if fresh else self.row_views(i)
        for j, p in enumerate(self.params):
            p.grad = None if views is None else views[j]

    def not_dense(self) -> list[int]:
        """Parameters whose ``.grad`` is not a dense (strided) tensor, e.g. ``nn.Embedding(sparse=True)``."""
        return [j for j, p in enumerate(self.params) if p.grad is not None and p.grad.layout != torch.strided]

    def abandon_group(self) -> None:
        """Gives the ungrouped gradients back without touching any row (a refused capture)."""
        for p, saved in zip(self.params, self.saved, strict=True):
            p.grad = saved
        self.saved = []

    def end_group(self, i: int, fresh: bool) -> None:
        """Moves what the backward passes left in ``.grad`` into row ``i``; restores the ungrouped grads."""
        for p, view, saved in zip(self.params, self.row_views(i), self.saved, strict=True):
            grad = p.grad
            if not self.same(grad, view):
                if grad is not None:
                    self.kind.local(view).copy_(self.kind.local(grad))
                elif fresh:
                    self.kind.local(view).zero_()  # no gradient from this group: a zero contribution
            p.grad = saved
        self.saved = []
        self._drop_history()

    def _drop_history(self) -> None:
        # backward(create_graph=True) accumulates into .grad with autograd recording, so the
        # rows may now carry a graph. Group gradients are data here: keep values, drop the graph.
        if any(block.requires_grad for block in self.blocks):
            self.blocks = [block.detach() for block in self.blocks]
            self._row_views, self._base_views = {}, None

    # -- combination -----------------------------------------------------------------------
    def has_ungrouped(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def _record_undo(self) -> None:
        """Before the first change to ``.grad`` or ``base`` in a step: what :meth:`revert` restores."""
        if self._undo is not None:
            return
        grads = [p.grad for p in self.params]
        on_base = self._base_views is not None and any(
            self.same(g, v) for g, v in zip(grads, self._base_views, strict=True)
        )
        self._undo = (grads, self.blocks[0][0].clone() if on_base else None)

    def revert(self) -> None:
        """Undoes :meth:`adopt_ungrouped` and :meth:`combine` of this step: ``.grad`` and the
        ungrouped gradient are as they were (the rows are never written by either)."""
        if self._undo is None:
            return
        grads, base = self._undo
        if base is not None:
            self.blocks[0][0].copy_(base)
        for p, grad in zip(self.params, grads, strict=True):
            p.grad = grad
        self._undo = None

    def adopt_ungrouped(self) -> None:
        """Moves every ungrouped ``.grad`` into ``base`` (zeros where none) and points ``.grad`` at it."""
        self._record_undo()
        for p, view in zip(self.params, self.base_views(), strict=True):
            grad = p.grad
            if self.same(grad, view):
                continue
            if grad is None:
                self.kind.local(view).zero_()
            else:
                local = self.kind.local(grad)
                self.kind.local(view).copy_(local.to_dense() if local.layout != torch.strided else local)
            p.grad = view

    def combine(self, m: int, weights: Tensor, scale: float | Tensor) -> None:
        """``base = scale · (ungrouped + Σ_i w_i row_i)``; ``.grad`` → ``base``.

        One GEMV per block (several blocks: tile by tile). ``scale`` may be a 0-d tensor (a clip
        coefficient, kept on the device); then an ungrouped gradient costs one more pass over ``n``.
        """

        def gemv(base: Tensor, keep: bool) -> None:
            w = weights.to(device=self.device)
            if isinstance(scale, Tensor):
                w, alpha = w * scale.to(w), 1.0
                if keep:
                    base.mul_(scale.to(device=self.device, dtype=base.real.dtype))
                beta = 1.0 if keep else 0.0  # beta 0 ignores base's stale values (NaN included)
            else:
                alpha, beta = scale, (scale if keep else 0.0)
            w = w.to(self.dtype)
            parts = self.parts(m)
            if len(parts) <= 2:
                start = 0
                for block in parts:
                    base.addmv_(block.T, w[start : start + block.shape[0]], beta=beta, alpha=alpha)
                    start, beta = start + block.shape[0], 1.0
            else:
                for lo, hi in column_tiles(self.n):
                    tile = torch.cat([p[:, lo:hi] for p in parts])
                    base[lo:hi].addmv_(tile.T, w, beta=beta, alpha=alpha)

        self.write_update(gemv)

    def write_update(self, fill: Callable[[Tensor, bool], None]) -> None:
        """Writes the update into the base row and points ``.grad`` at it, revertibly: records the
        undo, moves an ungrouped ``.grad`` into ``base``, then ``fill(base, keep)`` (``keep``: whether
        ``base`` holds the ungrouped gradient to scale and add to; else its values are stale)."""
        self._record_undo()
        keep = self.has_ungrouped()
        if keep:
            self.adopt_ungrouped()
        views = self.base_views()
        fill(self.blocks[0][0], keep)
        for p, view in zip(self.params, views, strict=True):
            p.grad = view

    def gram(self, m: int, columns: slice = slice(None), with_base: bool = False) -> Tensor:
        """Gram matrix of the ``m`` group rows (restricted to ``columns``); ``with_base``: of the rows
        and the ungrouped gradient, which comes last (zeros if there is none). It is computed from
        ``[base; rows]``, one contiguous matrix, then reordered."""
        if with_base and self.has_ungrouped():
            self.adopt_ungrouped()
            return _base_last(stacked_gram([p[:, columns] for p in self.parts(m, with_base=True)]), 0, 1)
        gram = stacked_gram([p[:, columns] for p in self.parts(m)])
        return torch.nn.functional.pad(gram, (0, 1, 0, 1)) if with_base else gram

    def rescaled_entries(
        self, m: int, rows: list[int], columns: slice = slice(None), with_base: bool = False
    ) -> Tensor:
        """:func:`rescaled_entries` of group rows ``rows`` (``m``: the ungrouped gradient) against
        every row, in the order of :meth:`gram` (an absent ungrouped gradient: zeros)."""
        base = with_base and self.has_ungrouped()
        parts = [p[:, columns] for p in self.parts(m, with_base=base)]
        out = torch.zeros((len(rows), m + (1 if with_base else 0)), dtype=torch.float64, device=self.device)
        present = [i for i, r in enumerate(rows) if r < m or base]
        if present:
            stacked = [(0 if rows[i] == m else rows[i] + 1) if base else rows[i] for i in present]
            entries = rescaled_entries(parts, stacked)
            out[present, : entries.shape[1]] = _base_last(entries, 1) if base else entries
        return out

    def amax(self, rows: list[int], m: int, columns: slice = slice(None)) -> Tensor:
        """``[len(rows)]`` largest magnitude of each listed group row (``m``: the ungrouped gradient)."""
        out = []
        for i in rows:
            if i == m and not self.has_ungrouped():  # no ungrouped gradient: base holds a spent update
                out.append(torch.zeros((), dtype=torch.float64, device=self.device))
                continue
            out.append(abs_max((self.blocks[0][0] if i == m else self.row(i))[columns]))
        return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64, device=self.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_row_views"] = {}
        state["_base_views"] = None
        return state
