"""Gram arithmetic over rows stored in one or several blocks: the products a flat buffer's
statistics are made of, and the float64 refinement of rows whose fast product over- or underflows.

``parts`` is a list of ``[rows_i, n]`` blocks whose rows, stacked in order, are the rows of the
statistic (the first one may be the update row, see :mod:`balancer.capture.flat_buffer`). The
product is tiled over columns: a few columns of every block are gathered into a small scratch
matrix, so ``k`` blocks cost the same passes as one. Low-precision rows are upcast chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "abs_max",
    "column_tiles",
    "gram_of",
    "real_rows",
    "rescaled_entries",
    "rows_to_rescale",
    "stacked_gram",
    "stacked_row",
    "with_rows",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_GRAM_MIN_TILE = 1024  # columns per tile of the batched Gram product (faster and more accurate than one GEMM)
_GRAM_MAX_PARTIALS = 1 << 20  # cap on the numbers in the per-tile partial products
_UPCAST_CHUNK = 1 << 20  # columns per float32 upcast of low-precision rows
_MERGE_TILE = 1 << 16  # columns gathered at a time when rows span several blocks (at least),
_MERGE_MAX_TILES = 64  # and few enough tiles that the Python loop stays short


def real_rows(t: Tensor) -> Tensor:
    """``[r, n]`` rows as real numbers: complex rows become ``[r, 2n]`` (real and imaginary parts)."""
    return torch.view_as_real(t).flatten(1) if t.is_complex() else t


def gram_of(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a bᵀ`` (``b`` defaults to ``a``) for ``[r, n]`` row blocks, summed over column tiles.

    Low-precision rows are upcast to float32 chunk by chunk, so the statistics do not inherit
    bfloat16's 8-bit mantissa. Complex rows give the real inner product ``Re Σ a·conj(b)``.
    """
    a = real_rows(a)
    b = a if b is None else real_rows(b)
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


def column_tiles(n: int) -> Iterator[tuple[int, int]]:
    tile = max(_MERGE_TILE, math.ceil(n / _MERGE_MAX_TILES))
    for lo in range(0, n, tile):
        yield lo, min(n, lo + tile)


def stacked_gram(parts: list[Tensor]) -> Tensor:
    """The Gram matrix of the rows of ``parts`` stacked in order (``[Σ r_i, Σ r_i]``).

    One part is :func:`gram_of`; several are read tile by tile, each tile of every part gathered
    into one scratch matrix, so the rows are read once whatever their number of blocks.
    """
    parts = [real_rows(p) for p in parts]
    if len(parts) == 1:
        return gram_of(parts[0])
    rows = sum(p.shape[0] for p in parts)
    dtype = torch.float32 if parts[0].dtype in _LOW_PRECISION else parts[0].dtype
    out = torch.zeros((rows, rows), dtype=dtype, device=parts[0].device)
    for lo, hi in column_tiles(parts[0].shape[1]):
        tile = torch.cat([p[:, lo:hi] for p in parts]).to(dtype)
        out.addmm_(tile, tile.T)
    return out


def abs_max(t: Tensor) -> Tensor:
    """``max |t|`` as a 0-d float64 tensor (0 for an empty tensor; NaN if ``t`` holds one), in one
    pass and without a temporary (``aminmax``: about 10x faster than ``t.abs().amax()``)."""
    t = real_rows(t[None])
    if not t.numel():
        return torch.zeros((), dtype=torch.float64, device=t.device)
    low, high = torch.aminmax(t)
    return torch.maximum(-low, high).to(torch.float64)


def stacked_row(parts: list[Tensor], index: int) -> Tensor:
    """Row ``index`` of the rows of ``parts`` stacked in order."""
    for part in parts:
        if index < part.shape[0]:
            return part[index]
        index -= part.shape[0]
    raise IndexError(index)


def rescaled_entries(parts: list[Tensor], rows: list[int]) -> Tensor:
    """``[len(rows), Σ r_i]`` float64: the Gram entries of the listed stacked rows against every row.

    Each listed row is divided by its largest magnitude before its products are taken, so that
    they neither overflow (norms above ~1e19 in float32) nor underflow (below ~1e-19); its entries
    are then multiplied back in float64. Entries between two listed rows use both scaled rows. The
    other rows are read once, in the rows' own precision: one more pass over them, only on the
    rare steps that need it. A zero row gives exact zeros, a non-finite row non-finite entries.
    """
    parts = [real_rows(p) for p in parts]
    work = torch.float32 if parts[0].dtype in _LOW_PRECISION else parts[0].dtype
    listed = [stacked_row(parts, r) for r in rows]
    scale = torch.stack([abs_max(row) for row in listed])
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
    divisor = scale[:, None].to(work)
    device = parts[0].device
    cross = torch.zeros((len(rows), sum(p.shape[0] for p in parts)), dtype=work, device=device)
    inner = torch.zeros((len(rows), len(rows)), dtype=work, device=device)
    for lo, hi in column_tiles(parts[0].shape[1]):  # tile by tile: no full-size scaled copy
        tile = torch.stack([row[lo:hi] for row in listed]).to(work) / divisor
        others = parts[0][:, lo:hi] if len(parts) == 1 else torch.cat([p[:, lo:hi] for p in parts])
        cross.addmm_(tile, others.to(work).T)
        inner.addmm_(tile, tile.T)
    cross = cross.to(torch.float64) * scale[:, None]
    inner = inner.to(torch.float64) * (scale[:, None] * scale[None, :])
    return cross.index_copy(1, torch.tensor(rows, device=device), inner)


def rows_to_rescale(rows: Sequence[int], amax: Tensor) -> list[int]:
    """The listed rows whose largest magnitude (reduced over ranks) is finite and nonzero: zero rows
    have exact zero entries already, and rows holding NaN/inf are non-finite indeed (one host sync)."""
    return [r for r, ok in zip(rows, (torch.isfinite(amax) & (amax > 0)).tolist(), strict=True) if ok]


def with_rows(gram: Tensor, rows: list[int], entries: Tensor) -> Tensor:
    """``gram`` with rows and columns ``rows`` replaced by ``entries`` (``[len(rows), k]``), symmetrically."""
    index = torch.tensor(rows, device=gram.device)
    return gram.index_copy(0, index, entries).index_copy(1, index, entries.T)
