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

from balancer._checks import check_group_name, check_loss
from balancer.capture.layer_gram import Call, Piece, constant_piece, weighted_delta, work
from balancer.capture.layer_gram import gram as layer_gram
from balancer.capture.local import LocalBackend
from balancer.contract.backend import Backend, NaNFlag
from balancer.errors import CaptureError

__all__ = ["LayerCapture"]

_Use = tuple[Tensor, str]  # (parameter, "weight" | "bias")


def _leaf(node: Any, through_t: bool) -> Any:
    """The parameter behind ``node`` (``[TBackward0 →] [ToCopyBackward0 →] AccumulateGrad``), or None."""
    if through_t:
        if node is None or type(node).__name__ != "TBackward0":
            return None
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ == "ToCopyBackward0":  # autocast's copy of the parameter
        node = node.next_functions[0][0]
    return getattr(node, "variable", None)


class LayerCapture(Backend):
    """The groups of one step captured by ``backward_samples``/``backward_tasks``; the step
    drives it like a backend."""

    def __init__(self, model: torch.nn.Module, backend: Backend) -> None:
        super().__init__()
        self._model = model
        self._backend = backend
        self._calls: dict[int, tuple[Tensor, str, list[Call]]] = {}  # by id(param)
        self._device = torch.device("cpu")
        self._poison = NaNFlag()
        self._owners_of: tuple[tuple[int, ...], list[Tensor], dict[int, tuple[str, str]]] | None = None
        self._undo: list[tuple[Tensor, Tensor | None]] | None = None  # .grad before expose/combine

    @property
    def optimizer(self) -> Any:
        return self._backend.optimizer

    @property
    def stats_device(self) -> torch.device:
        return self._device

    def enter(self, name: str) -> None:
        raise CaptureError(
            f"Cannot capture group `{name}` with `opt.group(...)`/`opt.backward(...)` in a step that used "
            "`backward_samples`/`backward_tasks`: use one way per step (call step() or zero_grad() in between)."
        )

    def exit(self) -> None:
        raise CaptureError("exit() without a matching enter().")

    # -- the graph -------------------------------------------------------------------------
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

    def _layers(self, roots: list[Any], batch: int | None) -> list[tuple[Any, Tensor | None, list[_Use]]]:
        """Walks the graph once: ``(node, saved input, [(param, role)])`` for every linear call."""
        owners = self._owners()
        found, seen, foreign = [], {}, []
        stack: list[tuple[Any, Any]] = [(root, None) for root in roots]
        while stack:
            node, parent = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node  # keeps the wrapper alive, so ids are not reused during the walk
            x, uses, claimed = _recognise(node, owners)
            if uses:
                found.append((node, x, uses))
                if batch is not None:
                    _check_batch_first(parent, batch)
            variable = getattr(node, "variable", None)
            if variable is not None and variable.requires_grad:
                foreign.append(owners.get(id(variable), (f"a tensor of shape {tuple(variable.shape)}", ""))[0])
            stack.extend((nxt, node) for i, (nxt, _) in enumerate(node.next_functions) if i not in claimed)
        if foreign:
            raise CaptureError(
                f"backward_samples/backward_tasks: {sorted(set(foreign))} receive gradient outside an nn.Linear "
                "call (weight tying, a penalty on the weights, an input that requires grad...). Only F.linear "
                "uses are supported."
            )
        return found

    def _register(self, layers: list[tuple[Any, Tensor | None, list[_Use]]]) -> list[Call]:
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

    # -- capture ---------------------------------------------------------------------------
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
        layers = self._layers([total.grad_fn], batch)
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
                piece = _sample_piece(delta, sample_group, None if grouped else order, counts, per_sample)
                call.pieces.append(piece)
        self._device = losses.device
        self._prune()
        sums = torch.zeros(len(self._names), dtype=torch.float64, device=losses.device)
        return sums.index_add_(0, sample_group, losses.detach().to(torch.float64))

    def capture_tasks(self, losses: Mapping[str, Tensor], retain_graph: bool | None) -> None:
        """Runs one backward per loss; each gives the output gradients of the calls it reaches."""
        self._check_backend()
        if not isinstance(losses, Mapping) or not losses:
            raise CaptureError(
                f"backward_tasks takes a non-empty dict {{group name: scalar loss}}. Found `{losses!r}`."
            )
        for name, loss in losses.items():
            check_group_name(name)
            check_loss(name, loss)
        items = list(losses.items())
        layers = self._layers([loss.grad_fn for _, loss in items], None)
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
    @torch.no_grad()
    def gram(self, *, ungrouped: bool = False) -> Tensor:
        if ungrouped:
            raise CaptureError("The layer capture has no ungrouped row: its update norm comes from update_norm().")
        return layer_gram([(role, calls) for _, role, calls in self._calls.values()], len(self._names), self._device)

    @property
    def gram_floor(self) -> float:
        n = sum(param.numel() for param, _, _ in self._calls.values())
        return n * torch.finfo(torch.float32).tiny * 1e6

    @torch.no_grad()
    def refine_gram(self, gram: Tensor, rows: Sequence[int]) -> Tensor:
        """The whole Gram matrix again in float64 (inputs and output gradients upcast): finite
        captures then never overflow or underflow. Rare: only when the fast matrix is suspect."""
        exact: dict[int, Call] = {}

        def upcast(call: Call) -> Call:
            if id(call) not in exact:
                pieces = [Piece(p.delta.double(), p.groups, p.counts, p.order) for p in call.pieces]
                exact[id(call)] = Call(None if call.x is None else call.x.double(), pieces)
            return exact[id(call)]

        params = [(role, [upcast(c) for c in calls]) for _, role, calls in self._calls.values()]
        return layer_gram(params, len(self._names), self._device)

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
            self._poison.plant(params[0].grad.view(-1)[:1], poison)

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
    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0) -> None:
        """Writes ``scale · (ungrouped + Σ_k w_k A_k)`` into ``.grad``, out of place (revertible)."""
        self._poison.restore()
        self._record_undo()
        rescale = isinstance(scale, Tensor) or scale != 1.0
        if rescale:
            for p in self._trained():
                if p.grad is not None:
                    p.grad = p.grad * (scale.to(p.grad.device, p.grad.dtype) if isinstance(scale, Tensor) else scale)
        weights = weights * scale
        weighted: dict[int, Tensor] = {}  # by id(call): a weight and its bias share their calls
        for param, role, calls in self._calls.values():
            update = None
            for call in calls:
                s = weighted.get(id(call))
                if s is None:
                    s = weighted[id(call)] = weighted_delta(call, weights)
                part = s.sum(0) if role == "bias" else s.T @ work(call.x)  # type: ignore[arg-type]
                update = part if update is None else update + part
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

    def extra_bytes(self) -> int:
        held = {}
        for _, _, calls in self._calls.values():
            for call in calls:
                for t in [call.x] + [p.delta for p in call.pieces]:
                    if t is not None:
                        held[t.data_ptr()] = t.numel() * t.element_size()
        return sum(held.values())


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


def _sample_piece(
    delta: Tensor, sample_group: Tensor, order: list[int] | None, counts: list[int], per_sample: int
) -> Piece:
    """A ``backward_samples`` piece: ``per_sample`` consecutive rows per sample; ``order`` sorts the
    samples by group (None: already sorted)."""
    delta = delta.detach().reshape(-1, delta.shape[-1])
    groups = sample_group if per_sample == 1 else sample_group.repeat_interleave(per_sample)
    row_order = None
    if order is not None:
        within = torch.arange(per_sample, device=delta.device)
        row_order = (torch.tensor(order, device=delta.device)[:, None] * per_sample + within).flatten()
    return Piece(delta, groups, tuple(c * per_sample for c in counts), row_order)


def _recognise(node: Any, owners: dict[int, tuple[str, str]]) -> tuple[Tensor | None, list[_Use], set[int]]:
    """``(saved input, [(param, role)], claimed input slots)`` of a linear node, else ``(None, [], {})``."""
    kind = type(node).__name__
    nexts = [fn for fn, _ in node.next_functions]
    if kind in ("AddmmBackward0", "MmBackward0"):
        if kind == "AddmmBackward0" and node._saved_alpha != 1:
            return None, [], set()
        slot = 2 if kind == "AddmmBackward0" else 1
        weight = _leaf(nexts[slot], through_t=True)
        x, uses, claimed = None, [], set()
        if weight is not None and owners.get(id(weight), ("", ""))[1] == "weight":
            x = (node._saved_mat1 if kind == "AddmmBackward0" else node._saved_self).detach()
            uses, claimed = [(weight, "weight")], {slot}
        bias = _leaf(nexts[0], through_t=False) if kind == "AddmmBackward0" else None
        if bias is not None and owners.get(id(bias), ("", ""))[1] == "bias" and node._saved_beta == 1:
            uses.append((bias, "bias"))
            claimed.add(0)
        return x, uses, claimed
    if kind == "AddBackward0" and node._saved_alpha == 1:
        for slot, nxt in enumerate(nexts):
            bias = _leaf(nxt, through_t=False)
            if bias is not None and owners.get(id(bias), ("", ""))[1] == "bias":
                return None, [(bias, "bias")], {slot}
    return None, [], set()


def _check_batch_first(parent: Any, batch: int) -> None:
    """A ``[B, T, d]`` input reaches ``mm`` flattened, and the view back to ``[B, T, d_out]`` is the
    layer's parent node: its leading size must be the batch (a ``[T, B, d]`` layout would
    silently mix samples)."""
    if type(parent).__name__ not in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        return
    shape = tuple(parent._input_metadata[0].shape)
    if len(shape) > 2 and shape[0] != batch:
        raise CaptureError(
            f"backward_samples: a linear layer's output has shape {shape} for {batch} samples. The batch "
            "dimension must lead every layer's input ([B, d] or [B, T, d]); transpose [T, B, d] inputs."
        )
