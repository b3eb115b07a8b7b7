"""The arithmetic of :mod:`balancer.capture.layer_capture`: group Gram and weighted update of one
``nn.Linear`` parameter from its calls' inputs ``X`` and the output gradients ``Δ``.

A parameter's captured data is a list of :class:`Call` (one per use of the layer in the graph),
each holding its input rows and the :class:`Piece` s that reached it: one output gradient per
capture of a loss, with the group of each row. Group ``k``'s gradient of the weight is
``A_k = Σ δ_r x_rᵀ`` over the rows of its pieces, of the bias ``b_k = Σ δ_r``.

Three exact ways to the weight's Gram ``G_kl = ⟨A_k, A_l⟩``; :func:`choose_form` takes the one
with fewest multiply-adds (``P`` piece rows, ``R`` call rows, ``k`` groups):

* ``rows``: every piece row against every other, ``G_kl = Σ_{g(r)=k, g(s)=l} (δ_r·δ_s)(x_r·x_s)``:
  ``P²(d_in + d_out)``. Best when each row belongs to one piece (groups of samples).
* ``shared``: ``E_k`` = group ``k``'s output gradient on the call rows, ``K = XXᵀ`` once, and
  ``G_kl = ⟨E_k, K E_l⟩``: ``R² d_in + k R² d_out + k² R d_out``. Best when several losses reach the
  same call (tasks on a shared trunk): ``X`` is used once instead of once per loss.
* ``per_group``: the ``A_k`` themselves, then ``A Aᵀ``: ``P d_in d_out + k² d_in d_out``. Best for
  long rows (sequences) with few groups; holds ``k·d_in·d_out`` numbers for one layer at a time.

A bias computed in the same call as its weight (``addmm``) is the weight's form with ``x``
extended by a constant 1 (``XXᵀ + 1``), at no extra cost; :func:`gram` sums the parameters.
The update ``Σ_k w_k A_k`` needs no group at all: ``(Σ_pieces s∘Δ)ᵀ X`` per call, ``s_r = w_g(r)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

FORMS = ("rows", "shared", "per_group")


@dataclass(frozen=True)
class Piece:
    """The output gradient of one captured loss at one call, and the group of each of its rows."""

    delta: Tensor  # [R, d_out]
    groups: Tensor  # [R] long
    counts: tuple[int, ...]  # rows per group (index = group) after sorting by `order`
    order: Tensor | None  # rows sorted by group; None: already sorted

    @property
    def group(self) -> int | None:
        """The group of every row when there is only one (a task's loss), else None."""
        used = [g for g, count in enumerate(self.counts) if count]
        return used[0] if len(used) == 1 else None


@dataclass
class Call:
    """One use of a linear layer: its input rows (``None`` for a bias) and the pieces reaching it."""

    x: Tensor | None  # [R, d_in]
    pieces: list[Piece] = field(default_factory=list)


def work(t: Tensor) -> Tensor:
    """Half-precision captures are summed in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def constant_piece(delta: Tensor, group: int) -> Piece:
    rows = delta.shape[0]
    groups = torch.full((rows,), group, dtype=torch.long, device=delta.device)
    return Piece(delta, groups, (0,) * group + (rows,), None)


def sample_piece(
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


def choose_form(piece_rows: int, call_rows: int, k: int, d_in: int, d_out: int) -> str:
    """The Gram form with the fewest multiply-adds (first of :data:`FORMS` on a tie)."""
    p, r = piece_rows, call_rows
    costs = {
        "rows": p * p * (d_in + d_out),
        "shared": r * r * d_in + k * r * r * d_out + k * k * r * d_out,
        "per_group": p * d_in * d_out + k * k * d_in * d_out,
    }
    return min(FORMS, key=costs.__getitem__)


def gram(params: list[tuple[str, list[Call]]], k: int, device: torch.device) -> Tensor:
    """``[k, k]`` float64: the group Gram matrix summed over the parameters ``(role, calls)``.

    A bias whose calls are its weight's (one ``addmm``) joins the weight's form: ``x`` extended
    by a constant 1 turns ``XXᵀ`` into ``XXᵀ + 1``. The ``rows`` forms of layers over the same rows
    (one ``backward_samples`` call) are summed before their one reduction by group.
    """
    out = torch.zeros((k, k), dtype=torch.float64, device=device)
    weights = {_key(calls) for role, calls in params if role == "weight"}
    biases = {_key(calls) for role, calls in params if role == "bias"}
    ghosts: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # rows -> (group of each row, summed ghost)
    for role, calls in params:
        if role == "bias":
            if _key(calls) not in weights:
                out += _bias_gram(calls, k).to(device, torch.float64)
            continue
        with_bias = _key(calls) in biases
        pieces = [p for c in calls for p in c.pieces]
        inputs = [cast(Tensor, c.x) for c in calls]  # a weight's calls all have their input rows
        d_in, d_out = inputs[0].shape[1], pieces[0].delta.shape[1]
        piece_rows = sum(p.delta.shape[0] for p in pieces)
        call_rows = sum(x.shape[0] for x in inputs)
        form = choose_form(piece_rows, call_rows, k, d_in, d_out)
        if form == "rows":
            rows = tuple(id(p.groups) for p in pieces)
            groups, ghost = _rows_ghost(calls, with_bias)
            if rows in ghosts:
                ghost += ghosts[rows][1]
            ghosts[rows] = (groups, ghost)
            continue
        part = _shared_gram(calls, k, with_bias) if form == "shared" else _per_group_gram(calls, k)
        if form == "per_group" and with_bias:
            part = part + _bias_gram(calls, k)
        out += part.to(device, torch.float64)
    for groups, ghost in ghosts.values():
        by_row = torch.zeros((k, ghost.shape[0]), dtype=ghost.dtype, device=ghost.device).index_add_(0, groups, ghost)
        out += torch.zeros((k, k), dtype=ghost.dtype, device=ghost.device).index_add_(1, groups, by_row).to(out)
    return out


def exact_gram(params: list[tuple[str, list[Call]]], k: int, device: torch.device) -> Tensor:
    """:func:`gram` in float64 (inputs and output gradients upcast): finite captures then never
    overflow or underflow."""
    exact: dict[int, Call] = {}

    def upcast(call: Call) -> Call:
        if id(call) not in exact:
            pieces = [Piece(p.delta.double(), p.groups, p.counts, p.order) for p in call.pieces]
            exact[id(call)] = Call(None if call.x is None else call.x.double(), pieces)
        return exact[id(call)]

    return gram([(role, [upcast(c) for c in calls]) for role, calls in params], k, device)


def _key(calls: list[Call]) -> tuple[int, ...]:
    return tuple(map(id, calls))


def _bias_gram(calls: list[Call], k: int) -> Tensor:
    sums = group_sums(calls, k)
    return sums @ sums.T


def group_sums(calls: list[Call], k: int) -> Tensor:
    """``[k, d_out]``: each group's summed output gradient (the bias gradients)."""
    first = calls[0].pieces[0].delta
    sums = torch.zeros((k, first.shape[1]), dtype=work(first).dtype, device=first.device)
    for call in calls:
        for piece in call.pieces:
            sums.index_add_(0, piece.groups, work(piece.delta))
    return sums


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _inputs_gram(x: Tensor, with_bias: bool) -> Tensor:
    """``XXᵀ``, plus 1 everywhere with the bias (its input is the constant 1)."""
    inner = x @ x.T
    return inner.add_(1.0) if with_bias else inner


def _rows_ghost(calls: list[Call], with_bias: bool) -> tuple[Tensor, Tensor]:
    """``(group of each piece row [P], ghost [P, P])`` with ``ghost_rs = ⟨δ_r x_rᵀ, δ_s x_sᵀ⟩``."""
    x = _cat([work(c.x) for c in calls for _ in c.pieces])  # type: ignore[arg-type]
    d = _cat([work(p.delta) for c in calls for p in c.pieces])
    groups = _cat([p.groups for c in calls for p in c.pieces])
    return groups, (d @ d.T).mul_(_inputs_gram(x, with_bias))


def _shared_gram(calls: list[Call], k: int, with_bias: bool) -> Tensor:
    x = _cat([work(c.x) for c in calls])  # type: ignore[arg-type]
    rows = x.shape[0]
    first = work(calls[0].pieces[0].delta)
    spread = torch.zeros((k * rows, first.shape[1]), dtype=first.dtype, device=first.device)  # E, [k·R, d_out]
    start = 0
    for call in calls:
        stop = start + call.x.shape[0]  # type: ignore[union-attr]
        for piece in call.pieces:
            if piece.group is not None:  # one group: a slice of its block
                g = piece.group * rows
                spread[g + start : g + stop] += work(piece.delta)
            else:
                at = piece.groups * rows + torch.arange(start, stop, device=x.device)
                spread.index_add_(0, at, work(piece.delta))
        start = stop
    spread = spread.view(k, rows, -1)
    mixed = torch.matmul(_inputs_gram(x, with_bias), spread)  # K E_l, [k, R, d_out]
    return spread.flatten(1) @ mixed.flatten(1).T


def _per_group_gram(calls: list[Call], k: int) -> Tensor:
    first = work(calls[0].pieces[0].delta)
    d_in = calls[0].x.shape[1]  # type: ignore[union-attr]
    per_group = torch.zeros((k, first.shape[1], d_in), dtype=first.dtype, device=first.device)
    for call in calls:
        for piece in call.pieces:
            x, d = work(call.x), work(piece.delta)  # type: ignore[arg-type]
            if piece.order is not None:
                x, d = x[piece.order], d[piece.order]
            start = 0
            for g, count in enumerate(piece.counts):
                if count:
                    per_group[g].addmm_(d[start : start + count].T, x[start : start + count])
                start += count
    flat = per_group.flatten(1)
    return flat @ flat.T


def weighted_delta(call: Call, weights: Tensor) -> Tensor:
    """``Σ_pieces s∘Δ`` with ``s_r = w_g(r)``: the call's output gradient of ``Σ_k w_k ℓ_k``."""
    first, *rest = call.pieces
    weights = weights.to(first.delta.device, work(first.delta).dtype)

    def factor(piece: Piece) -> Tensor:
        return weights[piece.groups][:, None] if piece.group is None else weights[piece.group]

    total = factor(first) * work(first.delta)
    for piece in rest:
        total.addcmul_(factor(piece), work(piece.delta))
    return total


def weighted_updates(params: list[tuple[str, list[Call]]], weights: Tensor) -> Iterator[Tensor | None]:
    """Each parameter's ``Σ_k w_k A_k`` in turn (None where no call is left): ``(s∘Δ)ᵀ X`` summed
    over its calls, ``s∘Δ`` computed once per call (a weight and its bias share their calls)."""
    weighted: dict[int, Tensor] = {}
    for role, calls in params:
        update = None
        for call in calls:
            s = weighted.get(id(call))
            if s is None:
                s = weighted[id(call)] = weighted_delta(call, weights)
            part = s.sum(0) if role == "bias" else s.T @ work(call.x)  # type: ignore[arg-type]
            update = part if update is None else update + part
        yield update
