"""Groups from ``nn.Linear`` inputs and output gradients, without per-group parameter gradients.

Two ways in, both needing ``Balancer(..., model=model)``:

* ``opt.backward_samples(losses, group=row_groups)``: the groups are samples of one batch (DPO
  chosen/rejected rows, replay and current rows). One backward pass of ``losses.sum()``; every
  row of a layer call belongs to one sample, hence to one group.
* ``opt.backward_tasks({name: loss})``: one scalar loss per group, like ``opt.backward``
  (tasks on a shared trunk, or one forward per group). One backward pass per loss.

Each backward pass asks ``torch.autograd.grad`` for the gradient ``Δ`` at the output of every
linear call in the graph, which skips the parameter gradients entirely; the call's input ``X``
is read from the graph (the ``addmm``/``mm`` node's saved input). A group's weight gradient is
``Σ δ_r x_rᵀ`` over its rows, so the Gram matrix and the update ``Σ_k w_k g_k`` follow exactly
from ``X`` and ``Δ`` (see :mod:`balancer.capture.layer_gram` for the three forms and their costs):
no ``[k, n]`` buffer, and with several tasks the shared trunk's ``X`` serves every task.
Memory: ``X`` and ``Δ`` of every call until ``step()`` (about the linear layers' activations,
times the number of losses that reach them).

Requirements, checked: every trained parameter is the weight or bias of an ``nn.Linear``, used
only as a linear layer (``F.linear``). For ``backward_samples`` the batch dimension leads each
layer's input (a ``[T, B, d]`` layout is refused when ``T ≠ B``; with ``T = B`` it cannot be
told apart). Not supported: layers that couple samples inside a group's loss (BatchNorm in
training mode), ``nn.Embedding``, convolutions, norms with parameters, distributed backends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from balancer._checks import check_group_name, check_losses
from balancer.capture.autograd_nodes import LinearUse, find_linear_calls
from balancer.capture.layer_gram import Call, Piece, constant_piece, exact_gram, sample_piece, weighted_updates
from balancer.capture.layer_gram import gram as layer_gram
from balancer.capture.local import LocalBackend
from balancer.contract.backend import Backend, NaNFlag
from balancer.errors import CaptureError

__all__ = ["LayerCapture"]


class LayerCapture:
    """The groups of one step captured by ``backward_samples``/``backward_tasks``: a capture
    source (:class:`~balancer.capture.source.CaptureSource`) the step drives as it drives the
    backend's group rows. Groups come in only through :meth:`capture_samples` and
    :meth:`capture_tasks`, never through ``opt.group``."""

    ungrouped_gram = False  # no ungrouped row: the update norm comes from update_norm()

    def __init__(self, model: torch.nn.Module, backend: Backend) -> None:
        self._model = model
        self._backend = backend
        self._names: list[str] = []  # groups of this step, in first-capture order
        self._calls: dict[int, tuple[Tensor, str, list[Call]]] = {}  # by id(param)
        self._device = torch.device("cpu")
        self._poison = NaNFlag()
        self._owners_of: tuple[tuple[int, ...], list[Tensor], dict[int, tuple[str, str]]] | None = None
        self._undo: list[tuple[Tensor, Tensor | None]] | None = None  # .grad before expose/combine

    @property
    def names(self) -> tuple[str, ...]:
        """Groups captured since the last ``end_step``, in first-capture order."""
        return tuple(self._names)

    @property
    def stats_device(self) -> torch.device:
        return self._device

    # -- capture ---------------------------------------------------------------------------
    def _owners(self) -> dict[int, tuple[str, str]]:
        """``id(param) → (name, role)`` of every trained parameter; rebuilt when that set changes."""
        params = [p for p in self._backend.trained_parameters() if p.requires_grad]
        key = tuple(map(id, params))  # the cache holds `params`, so these ids are not reused meanwhile
        if self._owners_of is not None and self._owners_of[0] == key:
            return self._owners_of[2]
        trained = set(key)
        owners, unsupported = {}, []
        for mod_name, module in self._model.named_modules():
            for role, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) not in trained:
                    continue
                name = f"{mod_name}.{role}" if mod_name else role
                if isinstance(module, torch.nn.Linear):
                    owners[id(p)] = (name, role)
                else:
                    unsupported.append(f"{name} ({type(module).__name__})")
        if unsupported:
            raise CaptureError(
                f"backward_samples/backward_tasks support only nn.Linear parameters; found {', '.join(unsupported)}. "
                "Freeze them (`requires_grad_(False)`) or use `opt.backward({group: loss})`."
            )
        self._owners_of = (key, params, owners)
        return owners

    def _register(self, layers: list[tuple[Any, Tensor | None, list[LinearUse]]]) -> list[Call]:
        """One :class:`Call` per linear node, listed under each of its parameters."""
        calls = []
        for _, x, uses in layers:
            call = Call(x)
            for param, role in uses:
                self._calls.setdefault(id(param), (param, role, []))[2].append(call)
            calls.append(call)
        return calls

    def _add_group(self, name: str) -> int:
        if name not in self._names:
            self._names.append(name)
        return self._names.index(name)

    def _check_backend(self) -> None:
        if type(self._backend) is not LocalBackend:
            raise CaptureError(
                f"backward_samples/backward_tasks work with the local backend only; this Balancer uses "
                f"`{type(self._backend).__name__}` (cross-rank Gram terms would need every rank's inputs)."
            )

    def capture_samples(self, losses: Tensor, group: str | Sequence[str], retain_graph: bool | None) -> Tensor:
        """Runs the backward of ``losses.sum()``; returns every group's loss sum ``[k]``."""
        self._check_backend()
        if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.numel() or not losses.requires_grad:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise CaptureError(
                f"backward_samples takes a [B] tensor of per-sample losses that requires grad; found {shape}."
            )
        batch = losses.shape[0]
        names = [group] * batch if isinstance(group, str) else list(group)
        if len(names) != batch:
            raise CaptureError(f"`group` must name one group per sample: {batch} losses, {len(names)} names.")
        for name in dict.fromkeys(names):
            check_group_name(name)
        total = losses.sum()
        layers = find_linear_calls([total.grad_fn], self._owners(), batch)
        edges = [GradientEdge(node, 0) for node, _, _ in layers]
        deltas = torch.autograd.grad(total, edges, retain_graph=retain_graph, allow_unused=True) if edges else ()
        rows = [None if delta is None else _rows_per_sample(delta, batch) for delta in deltas]
        # nothing below can fail: the step's state changes only now
        position = {name: self._add_group(name) for name in dict.fromkeys(names)}
        index = [position[n] for n in names]
        sample_group = torch.tensor(index, dtype=torch.long, device=losses.device)
        order = sorted(range(batch), key=index.__getitem__)
        grouped = order == list(range(batch))  # samples already sorted by group
        counts = [index.count(k) for k in range(len(self._names))]
        for call, delta, per_sample in zip(self._register(layers), deltas, rows, strict=True):
            if delta is not None:
                piece = sample_piece(delta, sample_group, None if grouped else order, counts, per_sample)
                call.pieces.append(piece)
        self._device = losses.device
        self._prune()
        sums = torch.zeros(len(self._names), dtype=torch.float64, device=losses.device)
        return sums.index_add_(0, sample_group, losses.detach().to(torch.float64))

    def capture_tasks(self, losses: Mapping[str, Tensor], retain_graph: bool | None) -> None:
        """Runs one backward per loss; each gives the output gradients of the calls it reaches."""
        self._check_backend()
        check_losses("backward_tasks", losses)
        items = list(losses.items())
        layers = find_linear_calls([loss.grad_fn for _, loss in items], self._owners(), None)
        edges = [GradientEdge(node, 0) for node, _, _ in layers]
        per_loss = []
        for i, (_, loss) in enumerate(items):
            keep = True if i < len(items) - 1 else retain_graph
            per_loss.append(torch.autograd.grad(loss, edges, retain_graph=keep, allow_unused=True) if edges else ())
        # every backward pass succeeded: the step's state changes only now
        calls = self._register(layers)
        for (name, _), deltas in zip(items, per_loss, strict=True):
            group = self._add_group(name)
            for call, delta in zip(calls, deltas, strict=True):
                if delta is not None:
                    call.pieces.append(constant_piece(delta.detach().reshape(-1, delta.shape[-1]), group))
        self._device = items[0][1].device
        self._prune()

    def _prune(self) -> None:
        """Forgets calls that no loss reached (``allow_unused``)."""
        for key, (param, role, calls) in list(self._calls.items()):
            kept = [c for c in calls if c.pieces]
            if kept:
                self._calls[key] = (param, role, kept)
            else:
                del self._calls[key]

    # -- statistics ------------------------------------------------------------------------
    def _by_param(self) -> list[tuple[str, list[Call]]]:
        return [(role, calls) for _, role, calls in self._calls.values()]

    @torch.no_grad()
    def gram(self, *, ungrouped: bool = False) -> Tensor:
        if ungrouped:
            raise CaptureError("The layer capture has no ungrouped row: its update norm comes from update_norm().")
        return layer_gram(self._by_param(), len(self._names), self._device)

    @property
    def gram_floor(self) -> float:
        n = sum(param.numel() for param, _, _ in self._calls.values())
        return n * torch.finfo(torch.float32).tiny * 1e6

    @torch.no_grad()
    def refine_gram(self, gram: Tensor, rows: Sequence[int]) -> Tensor:
        """The whole Gram matrix again in float64: finite captures then never overflow or
        underflow. Rare: only when the fast matrix is suspect."""
        return exact_gram(self._by_param(), len(self._names), self._device)

    # -- combination -----------------------------------------------------------------------
    def _trained(self) -> list[Tensor]:
        return [p for p in self._backend.trained_parameters() if p.requires_grad]

    def _record_undo(self) -> None:
        if self._undo is None:
            self._undo = [(p, p.grad) for p in self._trained()]

    def revert(self) -> None:
        self._poison.restore()
        if self._undo is not None:
            for p, grad in self._undo:
                p.grad = grad
            self._undo = None

    def capture_token(self) -> Any:
        return self._backend.capture_token()  # the same .grad: the backend has no group pending

    @torch.no_grad()
    def update_norm(self, norm_type: float) -> Tensor:
        return self._backend.update_norm(norm_type)  # combine() wrote .grad, which the backend measures

    @torch.no_grad()
    def scale_update(self, factor: Tensor) -> None:
        self._record_undo()
        for p in self._trained():
            if p.grad is not None:
                p.grad = p.grad * factor.to(p.grad.device, p.grad.dtype)

    @torch.no_grad()
    def expose_ungrouped(self, poison: Tensor | None = None) -> None:
        self._record_undo()
        params = self._trained()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if poison is not None and params:
            first = params[0].grad
            assert first is not None  # set just above
            self._poison.plant(first.view(-1)[:1], poison)

    @torch.no_grad()
    def drop(self, rows: Sequence[int]) -> None:
        """Zeroes the dropped groups' output gradients, and non-finite inputs (a kept group never
        has a nonzero gradient on such a row: its Gram entry would not be finite)."""
        dropped = torch.tensor(list(rows), dtype=torch.long, device=self._device)
        done: set[int] = set()
        for _, _, calls in self._calls.values():
            for call in calls:
                if id(call) in done:
                    continue
                done.add(id(call))
                if call.x is not None:  # out of place: x is the user's activation
                    call.x = torch.where(torch.isfinite(call.x), call.x, 0)
                for i, piece in enumerate(call.pieces):
                    bad = torch.isin(piece.groups, dropped.to(piece.groups.device))[:, None]
                    call.pieces[i] = Piece(torch.where(bad, 0, piece.delta), piece.groups, piece.counts, piece.order)

    @torch.no_grad()
    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0, rule: Any = None) -> None:
        """Writes ``scale · (ungrouped + Σ_k w_k A_k)`` into ``.grad``, out of place (revertible).
        There are no rows to apply a combine rule to (``rule``: refused by the step before this)."""
        assert rule is None, "the layer capture has no group rows for a combine rule"
        self._poison.restore()
        self._record_undo()
        rescale = isinstance(scale, Tensor) or scale != 1.0
        if rescale:
            for p in self._trained():
                if p.grad is not None:
                    p.grad = p.grad * (scale.to(p.grad.device, p.grad.dtype) if isinstance(scale, Tensor) else scale)
        params = [param for param, _, _ in self._calls.values()]
        for param, update in zip(params, weighted_updates(self._by_param(), weights * scale), strict=True):
            if update is None:
                continue
            if param.grad is None:
                param.grad = update.to(param.dtype)
            elif rescale:
                param.grad.add_(update.to(param.dtype))  # a tensor of this step's, made just above
            else:
                param.grad = param.grad + update.to(param.dtype)

    def end_step(self) -> None:
        self._poison.restore()
        self._names = []
        self._calls = {}
        self._undo = None

    def zero_grad(self, set_to_none: bool) -> None:
        """Discards the pending capture; the backend clears ``.grad``."""
        self.end_step()


def _rows_per_sample(delta: Tensor, batch: int) -> int:
    """Rows of a layer call per sample (``T`` for ``[B, T, d]`` inputs); refuses a count that does not divide."""
    rows = delta.numel() // delta.shape[-1]
    per_sample, rest = divmod(rows, batch)
    if rest or not per_sample:
        raise CaptureError(
            f"backward_samples: a linear layer has {rows} output rows for {batch} samples. "
            "The batch dimension must lead every layer's input ([B, d] or [B, T, d])."
        )
    return per_sample
