"""Group rows of the DeepSpeed backend: one row of this rank's owned gradient elements per group.

Rows carry nothing from one step to the next (each is zeroed when its group is first entered),
which allows a layout that is fast *and* never holds two copies:

- a contiguous ``[capacity, numel]`` block, so the Gram matrix is one GEMM and the combination
  one GEMV per stretch of columns;
- when a step has more groups than the block holds (the first step, or k grew), the extra rows
  are separate tensors: adding one never copies the others, so memory grows by exactly one row;
- at the start of the next step, before any row is written, the block and the extras are freed
  and one block of the new size is allocated: no moment holds the old and the new rows together.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION_CHUNK = 1 << 18  # columns upcast to float32 at a time for bf16 rows


class GroupRows:
    """Rows of ``numel`` elements of ``dtype``; row ``i`` belongs to the i-th group of the step."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.numel, self.dtype, self.device = numel, dtype, device
        self.block: Tensor | None = None
        self.extra: list[Tensor] = []

    @property
    def capacity(self) -> int:
        return 0 if self.block is None else self.block.shape[0]

    @property
    def nbytes(self) -> int:
        held = [*self.extra, *([self.block] if self.block is not None else [])]
        return sum(t.numel() * t.element_size() for t in held)

    def begin_step(self) -> None:
        """Called before the first row of a step is written: folds the extra rows into the block."""
        if not self.extra:
            return
        count = self.capacity + len(self.extra)
        self.block, self.extra = None, []  # free first, then allocate: never both at once
        self.block = torch.empty((count, self.numel), dtype=self.dtype, device=self.device)

    def row(self, i: int) -> Tensor:
        """Row ``i``, allocating extra rows as needed (contents undefined until written)."""
        while self.capacity + len(self.extra) <= i:
            self.extra.append(torch.empty(self.numel, dtype=self.dtype, device=self.device))
        return self.block[i] if i < self.capacity else self.extra[i - self.capacity]  # type: ignore[index]

    def _columns(self, m: int, lo: int, hi: int) -> Tensor:
        """``[m, hi - lo]``: a view of the block when it holds the m rows, else a stacked copy."""
        if m <= self.capacity:
            assert self.block is not None
            return self.block[:m, lo:hi]
        return torch.stack([self.row(i)[lo:hi] for i in range(m)])

    def parts(self, m: int) -> list[Tensor]:
        """Row tensors covering the first ``m`` rows in order (the block's, then the extra rows)."""
        out = [] if self.block is None or not min(m, self.capacity) else [self.block[: min(m, self.capacity)]]
        return out + [row[None] for row in self.extra[: max(0, m - self.capacity)]]

    @torch.no_grad()
    def gram(self, m: int) -> Tensor:
        """``A Aᵀ`` of the first ``m`` rows in float32 (float32 GEMM; bf16 rows upcast by chunks)."""
        if m <= self.capacity and self.dtype == torch.float32:
            a = self._columns(m, 0, self.numel)
            return a @ a.T
        chunk = _LOW_PRECISION_CHUNK if m <= self.capacity else max(1 << 16, -(-self.numel // 64))
        out = torch.zeros((m, m), dtype=torch.float32, device=self.device)
        for lo in range(0, self.numel, chunk):
            a = self._columns(m, lo, min(self.numel, lo + chunk)).float()
            out.addmm_(a, a.T)
        return out

    @torch.no_grad()
    def combination(self, out: Tensor, lo: int, hi: int, weights: Tensor, accumulate: bool) -> None:
        """``out (+)= Σ_i weights[i] · row_i[lo:hi]`` for the ``len(weights)`` first rows (``out`` float32)."""
        m = weights.numel()
        if not m:
            if not accumulate:
                out.zero_()
            return
        a = self._columns(m, lo, hi)
        a = a.T if a.dtype == torch.float32 else a.float().T
        if accumulate:
            out.addmv_(a, weights)
        else:
            torch.mv(a, weights, out=out)
