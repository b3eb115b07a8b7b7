"""Sample groups from one backward pass: the exact group Gram matrix and weighted update of
``nn.Linear`` layers without per-group gradients ("ghost Gram").

When the groups are subsets of the samples of one batch (DPO chosen/rejected rows, replay and
current rows), ``opt.backward_samples(losses, group=row_groups)`` runs one backward of
``losses.sum()`` and keeps, for every ``nn.Linear`` call, its input rows ``X`` and the gradient
``Δ`` of ``Σ_i ℓ_i`` w.r.t. its output rows. Row ``r`` of a layer call belongs to one sample
(``[B, T, d]`` inputs give ``T`` rows per sample), so, with ``g(r)`` the group of row ``r``:

* weight gradient of group ``k``: ``A_k = Σ_{g(r)=k} δ_r x_rᵀ``; bias: ``b_k = Σ_{g(r)=k} δ_r``;
* Gram: ``G_kl = Σ_{g(r)=k, g(s)=l} (δ_r·δ_s)(x_r·x_s)`` (weights) ``+ b_k·b_l`` (biases), exact
  also for sequences, repeated calls of a layer and several ``backward_samples`` calls (their
  rows are concatenated, so cross-call terms are included);
* update: ``W.grad += Σ_r s_r δ_r x_rᵀ`` and ``bias.grad += Σ_r s_r δ_r`` with ``s_r = w_g(r)``.

Per weight, the Gram is computed the cheaper way: the "ghost" form ``(ΔΔᵀ)∘(XXᵀ)`` summed by
group (``R²(d_in + d_out)`` flops, ``R²`` numbers for ``R`` rows), or the k per-group weight
gradients ``A_k``, one layer at a time (``R·d_in·d_out + k²·d_in·d_out`` flops, ``k·d_in·d_out``
numbers). Short rows (a batch of vectors) take the ghost form; long sequences the per-group one.

The layers are found in the autograd graph of ``losses`` (``addmm``/``mm`` nodes whose weight
is a ``Linear`` weight, the bias inside ``addmm`` or added by ``add``), which also gives ``X``
(the saved input). ``torch.autograd.grad`` with those nodes as inputs returns every ``Δ`` and
skips the weight gradients entirely; no module hook is registered. Memory: ``X`` and ``Δ`` of
every layer call are held until ``step()`` (about the activations of the linear layers).

Requirements, checked: every trained parameter is the weight or bias of an ``nn.Linear``, used
only as a linear layer (``F.linear``); the batch dimension leads each layer's input (a
``[T, B, d]`` layout is refused when ``T ≠ B``; with ``T = B`` it cannot be told apart). Not
supported: layers that couple samples inside a group's loss (BatchNorm in training mode: its
per-sample gradient has no such closed form), ``nn.Embedding``, convolutions, norms with
parameters, distributed backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._checks import check_group_name
from .backend import Backend, NaNFlag
from .errors import CaptureError
from .local import LocalBackend

__all__ = ["SampleGroups"]

_Chunk = tuple[Tensor | None, Tensor, Tensor, Tensor, list[int]]  # x, delta, row group, row order, counts


def _leaf(node: Any, through_t: bool) -> Any:
    """The parameter behind ``node`` (``[TBackward0 →] [ToCopyBackward0 →] AccumulateGrad``), or None."""
    if through_t:
        if node is None or type(node).__name__ != "TBackward0":
            return None
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ == "ToCopyBackward0":  # autocast's copy of the parameter
        node = node.next_functions[0][0]
    return getattr(node, "variable", None)


class SampleGroups(Backend):
    """The groups of one step captured by ``backward_samples``; the step drives it like a backend."""

    def __init__(self, model: torch.nn.Module, backend: Backend) -> None:
        super().__init__()
        self._model = model
        self._backend = backend
        self._chunks: dict[int, tuple[Tensor, str, list[_Chunk]]] = {}
        self._device = torch.device("cpu")
        self._poison = NaNFlag()
        self._batch = 0

    @property
    def optimizer(self) -> Any:
        return self._backend.optimizer

    @property
    def stats_device(self) -> torch.device:
        return self._device

    def enter(self, name: str) -> None:
        raise CaptureError(
            f"Cannot capture group `{name}` with `opt.group(...)`/`opt.backward(...)` in a step that used "
            "`backward_samples`: use one way per step (call step() or zero_grad() in between)."
        )

    def exit(self) -> None:
        raise CaptureError("exit() without a matching enter().")

    # -- capture ---------------------------------------------------------------------------
    def _owners(self) -> dict[int, tuple[str, str]]:
        trained = {id(p) for p in self._backend.trained_parameters() if p.requires_grad}
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
                f"backward_samples supports only nn.Linear parameters; found {', '.join(unsupported)}. Freeze them "
                "(`requires_grad_(False)`) or use `opt.backward({group: loss})` with one loss per group."
            )
        return owners

    def _layers(self, root: Any, owners: dict[int, tuple[str, str]]) -> list[tuple[Any, list[tuple[Tensor, str, Any]]]]:
        """Walks the graph once: ``(node, [(param, role, saved input)])`` for every linear node."""
        found, seen, stack, foreign = [], {}, [(root, None)], []
        while stack:
            node, parent = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node  # keeps the wrapper alive, so ids are not reused during the walk
            uses, claimed = self._recognise(node, owners)
            if uses:
                found.append((node, uses))
                self._check_batch_first(parent)
            variable = getattr(node, "variable", None)
            if variable is not None and variable.requires_grad:
                foreign.append(owners.get(id(variable), (f"a tensor of shape {tuple(variable.shape)}", ""))[0])
            stack.extend((nxt, node) for i, (nxt, _) in enumerate(node.next_functions) if i not in claimed)
        if foreign:
            raise CaptureError(
                f"backward_samples: {sorted(set(foreign))} receive gradient outside an nn.Linear call (weight "
                "tying, a penalty on the weights, an input that requires grad...). Only F.linear uses are supported."
            )
        return found

    def _check_batch_first(self, parent: Any) -> None:
        """A ``[B, T, d]`` input reaches ``mm`` flattened, and the view back to ``[B, T, d_out]`` is
        the layer's parent node: its leading size must be the batch (a ``[T, B, d]`` layout would
        silently mix samples)."""
        if type(parent).__name__ not in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
            return
        shape = tuple(parent._input_metadata[0].shape)
        if len(shape) > 2 and shape[0] != self._batch:
            raise CaptureError(
                f"backward_samples: a linear layer's output has shape {shape} for {self._batch} samples. The "
                "batch dimension must lead every layer's input ([B, d] or [B, T, d]); transpose [T, B, d] inputs."
            )

    @staticmethod
    def _recognise(node: Any, owners: dict[int, tuple[str, str]]) -> tuple[list[tuple[Tensor, str, Any]], set[int]]:
        kind = type(node).__name__
        nexts = [fn for fn, _ in node.next_functions]
        if kind in ("AddmmBackward0", "MmBackward0"):
            if kind == "AddmmBackward0" and node._saved_alpha != 1:
                return [], set()
            slot = 2 if kind == "AddmmBackward0" else 1
            weight = _leaf(nexts[slot], through_t=True)
            uses, claimed = [], set()
            if weight is not None and owners.get(id(weight), ("", ""))[1] == "weight":
                x = node._saved_mat1 if kind == "AddmmBackward0" else node._saved_self
                uses, claimed = [(weight, "weight", x.detach())], {slot}
            bias = _leaf(nexts[0], through_t=False) if kind == "AddmmBackward0" else None
            if bias is not None and owners.get(id(bias), ("", ""))[1] == "bias" and node._saved_beta == 1:
                uses.append((bias, "bias", None))
                claimed.add(0)
            return uses, claimed
        if kind == "AddBackward0" and node._saved_alpha == 1:
            for slot, nxt in enumerate(nexts):
                bias = _leaf(nxt, through_t=False)
                if bias is not None and owners.get(id(bias), ("", ""))[1] == "bias":
                    return [(bias, "bias", None)], {slot}
        return [], set()

    def capture(self, losses: Tensor, group: str | Sequence[str], retain_graph: bool | None) -> Tensor:
        """Runs the backward of ``losses.sum()``; returns each of this call's groups' loss sums ``[k]``."""
        if type(self._backend) is not LocalBackend:
            raise CaptureError(
                f"backward_samples works with the local backend only; this Balancer uses "
                f"`{type(self._backend).__name__}` (cross-rank Gram terms would need every rank's inputs)."
            )
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
            if name not in self._names:
                self._names.append(name)
        index = [self._names.index(n) for n in names]
        owners = self._owners()
        self._batch = batch
        total = losses.sum()
        layers = self._layers(total.grad_fn, owners)
        edges = [GradientEdge(node, 0) for node, _ in layers]
        deltas = torch.autograd.grad(total, edges, retain_graph=retain_graph, allow_unused=True) if edges else ()
        self._device = losses.device
        sample_group = torch.tensor(index, dtype=torch.long, device=losses.device)
        order = sorted(range(batch), key=index.__getitem__)
        sample_order = torch.tensor(order, dtype=torch.long, device=losses.device)
        counts = [index.count(k) for k in range(len(self._names))]
        for (node, uses), delta in zip(layers, deltas, strict=True):
            if delta is None:
                continue
            delta = delta.detach().reshape(-1, delta.shape[-1])
            per_sample, rest = divmod(delta.shape[0], batch)
            if rest or not per_sample:
                raise CaptureError(
                    f"backward_samples: a linear layer ({type(node).__name__}) has {delta.shape[0]} rows for {batch} "
                    "samples. The batch dimension must lead every layer's input ([B, d] or [B, T, d])."
                )
            rows = sample_group.repeat_interleave(per_sample)
            order_rows = (sample_order[:, None] * per_sample + torch.arange(per_sample, device=rows.device)).flatten()
            for param, role, x in uses:
                chunk = (x, delta, rows, order_rows, [c * per_sample for c in counts])
                self._chunks.setdefault(id(param), (param, role, []))[2].append(chunk)
        sums = torch.zeros(len(self._names), dtype=torch.float64, device=losses.device)
        return sums.index_add_(0, sample_group, losses.detach().to(torch.float64))

    # -- statistics ------------------------------------------------------------------------
    @torch.no_grad()
    def gram(self) -> Tensor:
        k = len(self._names)
        out = torch.zeros((k, k), dtype=torch.float64, device=self._device)
        for _, role, chunks in self._chunks.values():
            if role == "bias":
                sums = sum(_group_sums(d, rows, k) for _, d, rows, _, _ in chunks)
                out += (sums @ sums.T).to(out.device, torch.float64)
            else:
                out += _weight_gram(chunks, k).to(out.device, torch.float64)
        return out

    # -- combination -----------------------------------------------------------------------
    def _trained(self) -> list[Tensor]:
        return [p for p in self._backend.trained_parameters() if p.requires_grad]

    @torch.no_grad()
    def expose_ungrouped(self, poison: Tensor | None = None) -> None:
        params = self._trained()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if poison is not None and params:
            self._poison.plant(params[0].grad.view(-1)[:1], poison)

    @torch.no_grad()
    def drop(self, rows: Sequence[int]) -> None:
        dropped = torch.tensor(list(rows), dtype=torch.long, device=self._device)
        for _, _, chunks in self._chunks.values():
            for i, (x, d, g, order, counts) in enumerate(chunks):
                bad = torch.isin(g, dropped.to(g.device))[:, None]
                x = None if x is None else torch.where(bad, 0, x)  # out of place: x is the user's activation
                chunks[i] = (x, torch.where(bad, 0, d), g, order, counts)

    @torch.no_grad()
    def combine(self, weights: Tensor, *, scale: float = 1.0) -> None:
        self._poison.restore()
        if scale != 1.0:
            grads = [p.grad for p in self._trained() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        for param, role, chunks in self._chunks.values():
            update = None
            for x, d, rows, _, _ in chunks:
                d = _work(d)
                s = (weights.to(d.device, d.dtype) * scale)[rows][:, None] * d
                part = s.sum(0) if role == "bias" else s.T @ _work(x)  # type: ignore[arg-type]
                update = part if update is None else update + part
            if update is None:
                continue
            if param.grad is None:
                param.grad = update.to(param.dtype)
            else:
                param.grad.add_(update.to(param.dtype))

    def end_step(self) -> None:
        self._poison.restore()
        self._names = []
        self._chunks = {}

    def zero_grad(self, set_to_none: bool) -> None:
        """Discards the pending capture; the backend clears ``.grad``."""
        self.end_step()

    def extra_bytes(self) -> int:
        held = {}
        for _, _, chunks in self._chunks.values():
            for x, d, _, _, _ in chunks:
                for t in (x, d):
                    if t is not None:
                        held[t.data_ptr()] = t.numel() * t.element_size()
        return sum(held.values())


def _work(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _group_sums(d: Tensor, rows: Tensor, k: int) -> Tensor:
    return torch.zeros((k, d.shape[1]), dtype=_work(d).dtype, device=d.device).index_add_(0, rows, _work(d))


def use_ghost(rows: int, k: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost form costs fewer flops than the k per-group weight gradients."""
    return rows * rows * (d_in + d_out) <= (rows + k * k) * d_in * d_out


def _weight_gram(chunks: list[_Chunk], k: int) -> Tensor:
    """Group Gram of one weight: the ghost form or the per-group gradients, whichever costs less."""
    r = sum(d.shape[0] for _, d, _, _, _ in chunks)
    d_in, d_out = chunks[0][0].shape[1], chunks[0][1].shape[1]  # type: ignore[union-attr]
    if use_ghost(r, k, d_in, d_out):
        x, d, rows = (_cat([_work(c[i]) for c in chunks]) for i in range(3))  # type: ignore[arg-type]
        ghost = (d @ d.T) * (x @ x.T)  # [R, R]: ⟨δ_r x_rᵀ, δ_s x_sᵀ⟩
        by_row = torch.zeros((k, r), dtype=ghost.dtype, device=ghost.device).index_add_(0, rows, ghost)
        return torch.zeros((k, k), dtype=ghost.dtype, device=ghost.device).index_add_(1, rows, by_row)
    per_group = torch.zeros((k, d_out, d_in), dtype=_work(chunks[0][1]).dtype, device=chunks[0][1].device)
    for x, d, _, order, counts in chunks:
        xs, ds = _work(x)[order], _work(d)[order]  # type: ignore[index]
        start = 0
        for g, count in enumerate(counts):
            if count:
                per_group[g].addmm_(ds[start : start + count].T, xs[start : start + count])
            start += count
    flat = per_group.flatten(1)
    return flat @ flat.T
