"""The DeepSpeed backend: this rank's owned share of every group gradient, one row per group.

Mechanism and usage: :mod:`balancer.integrations.deepspeed`. Where DeepSpeed keeps the reduced
gradient for each stage: :mod:`._deepspeed_sources`. Row layout: :mod:`._deepspeed_rows`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from balancer.capture.row_gram import (
    abs_max,
    rescaled_entries,
    rows_to_rescale,
    stacked_gram,
    stacked_row,
    with_rows,
)
from balancer.contract.backend import Backend
from balancer.errors import BalancerError, CaptureError

from ._agreement import RankAgreement, RankReductions
from ._deepspeed_checkpoints import wrap_checkpoints
from ._deepspeed_checks import check_supported
from ._deepspeed_rows import GroupRows
from ._deepspeed_sources import GradientSource, make_source

if TYPE_CHECKING:
    from balancer import Balancer

__all__ = ["DeepSpeedBackend"]

_MIN_CHUNK = 1 << 16  # columns combined at a time: at least this many,
_MAX_CHUNKS = 64  # and few enough stretches that the Python loop stays short


class DeepSpeedBackend(RankReductions, Backend):
    """Group gradients of a ``DeepSpeedEngine``: this rank's owned share, one row per group.

    Clipping: DeepSpeed's own ``gradient_clipping`` clips what ``engine.step()`` reads, the balanced
    update, with torch's rule; the Balancer then only reports that clip (``last_stats.grad_norm``
    and ``clip_coef``, from the Gram matrix) and refuses a clip of its own on top. With
    ``gradient_clipping`` 0 the Balancer's ``max_grad_norm``/``clip_grad_norm_`` (L2) clip instead.
    The ungrouped gradient is a separate vector here, so its cross terms cost one more pass over
    the rows, on steps that have one.

    ``engine.step()`` while gradients are captured: refused (:class:`~balancer.errors.CaptureError`)
    by default, since it would apply an uncombined gradient. With ``step_inside_backward=True``, for
    frameworks that call ``engine.step()`` at the end of every backward pass (accelerate's
    ``DeepSpeedEngineWrapper``, hence ``transformers.Trainer``), such a call is deferred instead: it
    does nothing, and ``opt.step()`` combines the groups and then steps the engine once.
    """

    ungrouped_gram = True

    def __init__(self, engine: Any, *, step_inside_backward: bool = False) -> None:
        super().__init__()
        check_supported(engine)
        self.engine = engine
        self.step_inside_backward = step_inside_backward
        self.source: GradientSource = make_source(engine)
        group = self.source.group
        self._world = dist.get_world_size(group)
        comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else self.source.device
        self._agreement = RankAgreement(group, comm_device)
        self._chunk = max(_MIN_CHUNK, -(-self.source.numel // _MAX_CHUNKS))
        self._rows = GroupRows(self.source.numel, self.source.dtype, self.source.device)  # row i: self._names[i]
        self._base: Tensor | None = None  # ungrouped gradient
        self._base_used = False
        self._fresh: set[int] = set()  # rows entered but not written yet
        self._agreed_step = False
        self._stepping = False
        self.balancer: Balancer | None = None  # set by attach()
        _install(engine, self)
        engine.set_gradient_accumulation_boundary(True)

    def attach(self, balancer: Balancer) -> None:
        self.balancer = balancer  # the engine's checkpoint methods carry its state

    def trained_parameters(self) -> list[Tensor]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def backward(self, loss: Tensor, retain_graph: bool | None = None) -> None:
        self.engine.backward(loss, retain_graph=bool(retain_graph))

    # -- queries ---------------------------------------------------------------------------
    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    @property
    def pending(self) -> bool:
        """Whether gradients were captured since the last step (grouped or ungrouped)."""
        return bool(self._names) or self._base_used

    @property
    def stats_device(self) -> torch.device:
        return self.source.device

    def extra_bytes(self) -> int:
        base = 0 if self._base is None else self._base.numel() * self._base.element_size()
        return self._rows.nbytes + base

    # -- capture ---------------------------------------------------------------------------
    def enter(self, name: str) -> None:
        self._agreement.check(f"enter group {name!r}")
        self.engine.set_gradient_accumulation_boundary(True)
        if name in self._names:
            self._active = self._names.index(name)
            return
        if not self._names:
            self._rows.begin_step()
        self._fresh.add(len(self._names))  # written by its first capture (copy, not add): no zeroing pass
        self._names.append(name)
        self._active = len(self._names) - 1

    def exit(self) -> None:
        if self._active is None:
            raise CaptureError("exit() without a matching enter().")
        self._active = None

    @torch.no_grad()
    def capture(self) -> None:
        """Called after each DeepSpeed reduction: moves the reduced owned gradient into its row."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise CaptureError(
                "engine.backward ran without a gradient accumulation boundary, so its gradient was not reduced "
                "across ranks. Do not call engine.set_gradient_accumulation_boundary(False) with a Balancer."
            )
        if self._active is not None:
            target, fresh = self._rows.row(self._active), self._active in self._fresh
            self._fresh.discard(self._active)
        else:
            if self._base is None:
                self._base = torch.empty(self.source.numel, dtype=self.source.dtype, device=self.source.device)
            target, fresh = self._base, not self._base_used
            self._base_used = True
        self.source.read_into(target, accumulate=not fresh)
        self.source.clear()

    # -- statistics ------------------------------------------------------------------------
    def _agree_step(self) -> None:
        if not self._agreed_step:
            self._agreement.check(f"step() with groups {self._names}")
            self._agreed_step = True

    def _settle(self) -> None:
        """Rows of groups entered without any backward pass hold zeros."""
        for i in self._fresh:
            self._rows.row(i).zero_()
        self._fresh.clear()

    @torch.no_grad()
    def gram(self, *, ungrouped: bool = False) -> Tensor:
        self._agree_step()
        self._settle()
        m = len(self._names)
        if not ungrouped:
            return self._agreement.sum(self._rows.gram(m).to(torch.float64))
        parts = self._parts(m, ungrouped=True)
        if not parts:
            return torch.zeros((m + 1, m + 1), dtype=torch.float64, device=self.source.device)
        gram = stacked_gram(parts).to(torch.float64)
        return self._agreement.sum(gram if self._base_used else torch.nn.functional.pad(gram, (0, 1, 0, 1)))

    def _parts(self, m: int, ungrouped: bool) -> list[Tensor]:
        """Row tensors of ``[rows; ungrouped]`` (the ungrouped row only when there is one)."""
        parts = self._rows.parts(m)
        if ungrouped and self._base_used:
            assert self._base is not None
            parts.append(self._base[None])
        return parts

    @property
    def gram_floor(self) -> float:
        return self.source.numel * self._world * torch.finfo(torch.float32).tiny * 1e6

    @torch.no_grad()
    def refine_gram(self, gram: Tensor, rows: Sequence[int]) -> Tensor:
        """Zero and non-finite rows are right already; the other listed rows get their entries
        again from the row scaled by its largest magnitude (rare; one more pass over the rows)."""
        m = len(self._names)
        ungrouped = gram.shape[0] == m + 1
        parts = self._parts(m, ungrouped)
        present = [r for r in rows if r < m or self._base_used]  # an unused ungrouped row is zero
        amax = torch.zeros(len(rows), dtype=torch.float64, device=self.source.device)
        if present:
            local = torch.stack([abs_max(stacked_row(parts, r)) for r in present])
            amax[[rows.index(r) for r in present]] = local.nan_to_num(torch.inf)
        redo = rows_to_rescale(rows, self._agreement.reduce(amax, "max"))
        if not redo:
            return gram
        entries = rescaled_entries(parts, redo) if parts else gram.new_zeros((len(redo), 0))
        if ungrouped and not self._base_used:
            entries = torch.nn.functional.pad(entries, (0, 1))
        return with_rows(gram, redo, self._agreement.sum(entries.to(gram)))

    def framework_clipping(self) -> float | None:
        clip = float(getattr(self.engine, "gradient_clipping", lambda: 0.0)() or 0.0)
        return clip if clip > 0 else None

    # -- combination -----------------------------------------------------------------------
    def expose_ungrouped(self, poison: Tensor | None = None) -> None:
        """Nothing to do: DeepSpeed does its own mixed precision; a ``GradScaler`` is not used with it."""

    @torch.no_grad()
    def drop(self, rows: Sequence[int]) -> None:
        for r in rows:
            self._rows.row(r).zero_()

    @torch.no_grad()
    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0, rule: Any = None) -> None:
        assert rule is None, "combine rules are refused with DeepSpeed when the Balancer is built"
        self._agree_step()  # ranks without groups never called gram(): agree here instead
        self._settle()
        base = self._base if self._base_used else None
        w = weights.to(device=self.source.device, dtype=torch.float32)
        rescale = isinstance(scale, Tensor) or scale != 1.0
        factor = scale.to(device=self.source.device, dtype=torch.float32) if isinstance(scale, Tensor) else scale

        def fill(out: Tensor, start: int, stop: int) -> None:
            for lo in range(start, stop, self._chunk):
                hi = min(stop, lo + self._chunk)
                dst = out[lo - start : hi - start]
                acc = dst if dst.dtype == torch.float32 else torch.empty(hi - lo, device=dst.device)
                if base is not None:
                    acc.copy_(base[lo:hi])
                self._rows.combination(acc, lo, hi, w, accumulate=base is not None)
                if rescale:
                    acc.mul_(factor)
                if acc is not dst:
                    dst.copy_(acc)

        self.source.write(fill)

    def optimizer_step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            raise BalancerError(
                "opt.step(closure): a DeepSpeed engine steps without a closure. Run the forward and backward "
                "passes before opt.step() and call it with no argument."
            )
        self._stepping = True
        try:
            self.engine.step()
        finally:
            self._stepping = False
        self.engine.set_gradient_accumulation_boundary(True)
        return None

    def end_step(self) -> None:
        self._names = []
        self._fresh.clear()
        self._active = None
        self._base_used = False
        self._agreed_step = False

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool) -> None:
        self.end_step()
        self.source.clear()


def _install(engine: Any, backend: DeepSpeedBackend) -> None:
    """Points ``engine`` at ``backend`` and, once per engine, wraps on that instance (the class and other
    engines are untouched): ``_backward_epilogue`` (capture after each reduction), ``step`` (refused,
    or deferred with ``step_inside_backward``, while groups are pending: ``opt.step()`` must combine
    them first) and the checkpoint methods."""
    engine.__dict__["_balancer_backend"] = weakref.ref(backend)
    if "_backward_epilogue" in engine.__dict__:
        return
    epilogue = engine._backward_epilogue

    def backward_epilogue() -> None:
        epilogue()
        current = engine.__dict__["_balancer_backend"]()
        if current is not None:
            current.capture()

    step = engine.step

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        current = engine.__dict__["_balancer_backend"]()
        if current is not None and current.pending and not current._stepping:
            if current.step_inside_backward:
                return None  # deferred: opt.step() combines the groups, then steps the engine
            raise CaptureError(
                f"engine.step() called with gradients captured by the Balancer pending (groups {list(current.names)}"
                f"{', and ungrouped' if current._base_used else ''}): they are not combined yet. Call opt.step() "
                "instead; it combines them, then calls engine.step() itself."
            )
        return step(*args, **kwargs)

    engine.__dict__.update(_backward_epilogue=backward_epilogue, step=guarded_step)
    wrap_checkpoints(engine)
