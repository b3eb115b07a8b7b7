"""``FlatBuffer``: the group rows and the combined gradient of parameters of one (device, dtype).

Row ``i`` holds group ``i``'s gradient flattened over the parameters (``n`` numbers). Rows live
in one contiguous ``[k, n]`` block in steady state; when a new group appears mid-step, its row
gets a block of its own (no copy of the rows already captured), and the blocks are merged into
one at the end of the step. ``base`` (``n`` numbers) receives ``ungrouped + Σ_k w_k g_k``; the
parameters' ``.grad`` are then views into it, exactly where the inner optimizer reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["FlatBuffer", "TensorKind", "gram_of"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_GRAM_MIN_TILE = 1024  # columns per tile of the batched Gram product (faster and more accurate than one GEMM)
_GRAM_MAX_PARTIALS = 1 << 20  # cap on the numbers in the per-tile partial products
_UPCAST_CHUNK = 1 << 20  # columns per float32 upcast of low-precision rows


def gram_of(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a bᵀ`` (``b`` defaults to ``a``) for ``[r, n]`` row blocks, summed over column tiles.

    Low-precision rows are upcast to float32 chunk by chunk, so the statistics do not inherit
    bfloat16's 8-bit mantissa.
    """
    b = a if b is None else b
    if a.dtype in _LOW_PRECISION:
        out = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
        for ca, cb in zip(a.split(_UPCAST_CHUNK, dim=1), b.split(_UPCAST_CHUNK, dim=1), strict=True):
            out.addmm_(ca.float(), cb.float().T)
        return out
    n = a.shape[1]
    tiles = min(n // _GRAM_MIN_TILE, _GRAM_MAX_PARTIALS // max(1, a.shape[0] * b.shape[0]))
    if tiles < 2 or a.stride(1) != 1 or b.stride(1) != 1:
        return a @ b.T
    tile = n // tiles
    split = tiles * tile
    ta = a[:, :split].unflatten(1, (tiles, tile)).transpose(0, 1)
    tb = b[:, :split].unflatten(1, (tiles, tile)).transpose(0, 1)
    out = torch.bmm(ta, tb.transpose(1, 2)).sum(0)
    if split < n:
        out += a[:, split:] @ b[:, split:].T
    return out


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
    """Group rows and the combined-gradient row for parameters of one (device, dtype)."""

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
        self.blocks: list[Tensor] = []
        self.base: Tensor | None = None
        self.saved: list[Tensor | None] = []
        self._row_views: dict[int, list[Tensor]] = {}
        self._base_views: list[Tensor] | None = None

    # -- storage ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return sum(block.shape[0] for block in self.blocks)

    def nbytes(self) -> int:
        return sum(block.numel() * block.element_size() for block in self.blocks)

    def ensure_rows(self, count: int) -> None:
        """Makes room for ``count`` rows; new rows get a block of their own (nothing is copied)."""
        missing = count - self.capacity
        if missing > 0:
            self.blocks.append(torch.empty((missing, self.n), dtype=self.dtype, device=self.device))

    def consolidate(self) -> None:
        """Between steps: one contiguous block with room for every row (the rows' values are spent)."""
        if len(self.blocks) > 1:
            capacity = self.capacity
            self.blocks = []
            self._row_views = {}  # the views would keep the old blocks alive: 2·k·n at the peak
            self.blocks = [torch.empty((capacity, self.n), dtype=self.dtype, device=self.device)]

    def row_blocks(self, m: int) -> Iterator[tuple[int, Tensor]]:
        """``(first row, block)`` pairs covering rows ``0 .. m-1``."""
        start = 0
        for block in self.blocks:
            if start >= m:
                return
            yield start, block[: m - start]
            start += block.shape[0]

    def row(self, i: int) -> Tensor:
        for start, block in self.row_blocks(i + 1):
            if i < start + block.shape[0]:
                return block[i - start]
        raise IndexError(i)

    def _views(self, flat: Tensor) -> list[Tensor]:
        spans = zip(self.params, self.locals, self.offsets[:-1], self.offsets[1:], strict=True)
        return [self.kind.wrap(p, flat[start:end].view_as(local)) for p, local, start, end in spans]

    def row_views(self, i: int) -> list[Tensor]:
        if i not in self._row_views:
            self._row_views[i] = self._views(self.row(i))
        return self._row_views[i]

    def base_views(self) -> list[Tensor]:
        if self.base is None:
            self.base = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        if self._base_views is None:
            self._base_views = self._views(self.base)
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
            self._row_views = {}

    # -- combination -----------------------------------------------------------------------
    def has_ungrouped(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def adopt_ungrouped(self) -> None:
        """Moves every ungrouped ``.grad`` into ``base`` (zeros where none) and points ``.grad`` at it."""
        for p, view in zip(self.params, self.base_views(), strict=True):
            grad = p.grad
            if self.same(grad, view):
                continue
            if grad is None:
                self.kind.local(view).zero_()
            else:
                self.kind.local(view).copy_(self.kind.local(grad))
            p.grad = view

    def combine(self, m: int, weights: Tensor, scale: float) -> None:
        """``base = scale · (ungrouped + Σ_i w_i row_i)``, one GEMV per block; ``.grad`` → ``base``."""
        keep = self.has_ungrouped()
        if keep:
            self.adopt_ungrouped()
        views = self.base_views()
        assert self.base is not None
        w = weights.to(device=self.device, dtype=self.dtype)
        beta = scale if keep else 0.0  # beta 0 ignores base's stale values (NaN included)
        for start, block in self.row_blocks(m):
            self.base.addmv_(block.T, w[start : start + block.shape[0]], beta=beta, alpha=scale)
            beta = 1.0
        for p, view in zip(self.params, views, strict=True):
            p.grad = view

    def gram(self, m: int, columns: slice = slice(None)) -> Tensor:
        parts = [(start, block[:, columns]) for start, block in self.row_blocks(m)]
        if len(parts) == 1:
            return gram_of(parts[0][1])
        out = torch.empty(
            (m, m), dtype=torch.float32 if self.dtype in _LOW_PRECISION else self.dtype, device=self.device
        )
        for si, bi in parts:
            for sj, bj in parts:
                out[si : si + bi.shape[0], sj : sj + bj.shape[0]] = gram_of(bi, bj)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_row_views"] = {}
        state["_base_views"] = None
        return state
