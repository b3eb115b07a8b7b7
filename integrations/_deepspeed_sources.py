"""Where DeepSpeed keeps this rank's reduced gradient between ``engine.backward`` and ``engine.step``.

Every source answers the same three questions for the DeepSpeed backend
(:mod:`balancer.integrations.deepspeed`), always about the elements this rank *owns*, so that
summing Gram contributions over the data-parallel group counts every element exactly once:

- :meth:`GradientSource.read_into`: copy (or add) the gradient that the last reduction left
  behind into a group's row (1-D, :attr:`numel` elements, this rank's share only);
- :meth:`GradientSource.clear`: zero it, so the next backward starts from nothing (some layouts
  accumulate across backward passes, others are overwritten: zeroing makes both exact);
- :meth:`GradientSource.write`: put the combined gradient where ``engine.step()`` reads it. The
  caller passes ``fill(out, start, stop)``, which writes the combination of owned elements
  ``[start, stop)`` into ``out``; no full-size temporary is made.

Layouts (DeepSpeed 0.19, attribute names as DeepSpeed's own ``step()`` reads them):

=========================  ===========================================================================
ZeRO-1/2                   ``optimizer.averaged_gradients[i]``: a list of views whose concatenation is
                           this rank's flat partition of param group ``i``, rebuilt at every boundary
ZeRO-3                     ``optimizer.grad_partitions_flat_buffer``: every sub-group's partition, padded
stage 0 (fp32 and bf16)    ``param.grad``, averaged in place and identical on every rank: this rank owns
                           the ``1/W`` chunk of the concatenated gradients; the combination is computed
                           for that chunk and all-gathered
ZeRO-1 bf16 + fp32 accum   ``BF16_Optimizer.fp32_groups_gradients_flat[i]`` (replicated): this rank owns
                           ``fp32_groups_gradient_flat_partition[i]``; combined, then all-gathered
=========================  ===========================================================================
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from balancer.errors import CaptureError

Fill = Callable[[Tensor, int, int], None]


class GradientSource(abc.ABC):
    """This rank's owned share of the reduced gradient, as one 1-D vector of :attr:`numel` elements."""

    numel: int
    dtype: torch.dtype
    device: torch.device
    group: Any  # the process group over which the owned shares partition the model

    @abc.abstractmethod
    def segments(self) -> Iterator[tuple[int, Tensor]]:
        """``(offset, flat view)`` of the owned gradient now held, by increasing offset; gaps are zeros."""

    @torch.no_grad()
    def read_into(self, row: Tensor, accumulate: bool) -> None:
        """``row = `` (or ``+=`` when ``accumulate``) the owned gradient the last reduction produced."""
        end = 0
        for offset, flat in self.segments():
            target = row[offset : offset + flat.numel()]
            if accumulate:
                target.add_(flat)
                continue
            if offset > end:
                row[end:offset].zero_()
            target.copy_(flat)
            end = offset + flat.numel()
        if not accumulate and end < row.numel():
            row[end:].zero_()

    @abc.abstractmethod
    def clear(self) -> None:
        """Zeroes the reduced gradient so the next backward starts from zero."""

    @abc.abstractmethod
    def write(self, fill: Fill) -> None:
        """Writes the combined gradient where ``engine.step()`` reads it."""


class Zero12Source(GradientSource):
    """ZeRO-1/2 (``DeepSpeedZeroOptimizer``): the fragments of ``averaged_gradients[i]``."""

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer
        self.sizes = [int(s) for s in optimizer.partition_size]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.numel = self.offsets[-1]
        self.dtype = optimizer.gradient_accumulation_dtype
        self.device = optimizer.single_partition_of_fp32_groups[0].device
        self.group = optimizer.dp_process_group

    def segments(self) -> Iterator[tuple[int, Tensor]]:
        return iter(self._fragments())

    def _fragments(self) -> list[tuple[int, Tensor]]:
        """``(offset in the owned vector, flat view)`` of every fragment that holds a gradient now."""
        out = []
        for i, start in enumerate(self.offsets[:-1]):
            fragments = self.opt.averaged_gradients.get(i)
            if fragments is None:
                continue
            offset = start
            for fragment in fragments:
                flat = fragment.view(-1)
                out.append((offset, flat))
                offset += flat.numel()
            if offset - start > self.sizes[i]:
                raise CaptureError(
                    f"ZeRO partition {i} holds {offset - start} gradient elements, more than its partition size "
                    f"{self.sizes[i]}: this DeepSpeed version lays gradients out differently than expected. "
                    "Please report it with your DeepSpeed version."
                )
        return out

    @torch.no_grad()
    def clear(self) -> None:
        # Only DeepSpeed's compact fp32 buffer (bf16 weights, fp32 accumulation) accumulates across
        # boundaries; a plain fragment list is rebuilt at every boundary from the fresh ``.grad`` of
        # that backward (DeepSpeed sets ``.grad = None`` after each reduction), so it needs no pass.
        for i in range(len(self.sizes)):
            flat = getattr(self.opt.averaged_gradients.get(i), "flat_partition", None)
            if flat is not None:
                flat.zero_()

    @torch.no_grad()
    def write(self, fill: Fill) -> None:
        if any(self.opt.averaged_gradients.get(i) is None for i in range(len(self.sizes))):
            raise CaptureError(
                "opt.step() found no reduced gradient to update: call engine.backward(loss) (inside opt.group(...)) "
                "after the last step and before opt.step()."
            )
        for offset, flat in self._fragments():
            fill(flat, offset, offset + flat.numel())


class Zero3Source(GradientSource):
    """ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): the flat buffer of all gradient partitions."""

    def __init__(self, optimizer: Any) -> None:
        self.buffer: Tensor = optimizer.grad_partitions_flat_buffer
        self.numel = self.buffer.numel()
        self.dtype = self.buffer.dtype
        self.device = self.buffer.device
        self.group = optimizer.dp_process_group

    def segments(self) -> Iterator[tuple[int, Tensor]]:
        yield 0, self.buffer

    @torch.no_grad()
    def clear(self) -> None:
        self.buffer.zero_()

    @torch.no_grad()
    def write(self, fill: Fill) -> None:
        fill(self.buffer, 0, self.numel)


def _chunk(total: int, group: Any) -> tuple[int, int, int]:
    """``(chunk, start, stop)``: the ``1/W`` share of ``total`` replicated elements this rank owns."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = max(1, math.ceil(total / world))
    return chunk, min(total, rank * chunk), min(total, (rank + 1) * chunk)


class Stage0Source(GradientSource):
    """Stage 0: ``param.grad``, averaged in place by DeepSpeed and identical on every rank.

    Rows hold this rank's chunk of the concatenated gradients. :meth:`write` computes the
    combination of that chunk, all-gathers every rank's chunk into one padded flat buffer and
    points every ``param.grad`` at its view.
    """

    def __init__(self, params: list[Tensor], group: Any) -> None:
        self.params = params
        self.group = group
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.total = sum(p.numel() for p in params)
        self.numel, self.start, self.stop = _chunk(self.total, group)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.spans: list[tuple[Tensor, int, int, int]] = []  # (param, first, last, offset in chunk)
        begin = 0
        for p in params:
            end = begin + p.numel()
            first, last = max(begin, self.start), min(end, self.stop)
            if first < last:
                self.spans.append((p, first - begin, last - begin, first - self.start))
            begin = end

    def segments(self) -> Iterator[tuple[int, Tensor]]:
        for p, first, last, offset in self.spans:
            if p.grad is not None:
                yield offset, p.grad.reshape(-1)[first:last]

    @torch.no_grad()
    def clear(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def write(self, fill: Fill) -> None:
        # The gradients live only in this buffer, through the .grad views, until engine.step()
        # clears them (engine.zero_grad()); it is freed with them.
        flat = torch.empty(self.numel * self.world, dtype=self.dtype, device=self.device)
        mine = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        fill(mine, 0, self.numel)
        dist.all_gather_into_tensor(flat, mine, group=self.group)
        begin = 0
        for p in self.params:
            p.grad = flat[begin : begin + p.numel()].view_as(p)
            begin += p.numel()


class Bf16OptimizerSource(GradientSource):
    """ZeRO-1 with bf16 weights and fp32 gradient accumulation (``BF16_Optimizer``).

    DeepSpeed keeps a full, replicated fp32 gradient buffer per param group; this rank owns the
    slice ``fp32_groups_gradient_flat_partition[i]``. The combination is written into that slice
    and all-gathered, so the whole buffer (which DeepSpeed's norm and clipping read) is right.
    """

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer
        self.group = optimizer.dp_process_group
        parts = optimizer.fp32_groups_gradient_flat_partition
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + part.numel())
        self.numel = self.offsets[-1]
        self.dtype = parts[0].dtype
        self.device = parts[0].device
        world = dist.get_world_size(self.group)
        for flat, part in zip(optimizer.fp32_groups_gradients_flat, parts, strict=True):
            if flat.numel() != part.numel() * world:
                raise CaptureError(
                    f"BF16_Optimizer buffer of {flat.numel()} elements is not {world} partitions of {part.numel()}: "
                    "unexpected layout for this DeepSpeed version. Please report it with your DeepSpeed version."
                )

    def segments(self) -> Iterator[tuple[int, Tensor]]:
        return zip(self.offsets[:-1], self.opt.fp32_groups_gradient_flat_partition, strict=True)

    @torch.no_grad()
    def clear(self) -> None:
        self.opt.clear_hp_grads()

    @torch.no_grad()
    def write(self, fill: Fill) -> None:
        flats = self.opt.fp32_groups_gradients_flat  # full, replicated; this rank owns `part` of each
        for (start, part), flat in zip(self.segments(), flats, strict=True):
            fill(part, start, start + part.numel())
            dist.all_gather_into_tensor(flat, part.clone(), group=self.group)
        for flags in self.opt.fp32_groups_has_gradients:
            flags[:] = [True] * len(flags)


def make_source(engine: Any) -> GradientSource:
    """The source for this engine's optimizer wrapper (the configuration was checked before)."""
    opt = engine.optimizer
    kind = type(opt).__name__
    if kind == "DeepSpeedZeroOptimizer":
        return Zero12Source(opt)
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return Zero3Source(opt)
    if kind == "BF16_Optimizer":
        return Bf16OptimizerSource(opt)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return Stage0Source(params, engine.seq_data_parallel_group)
