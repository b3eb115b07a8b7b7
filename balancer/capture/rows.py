"""Groups that are rows of one forward pass, split at a tensor: ``opt.backward_rows(loss, at=..., group=...)``.

The groups are rows of one batch (DPO's chosen and rejected halves of one concatenated batch,
tasks mixed in one batch) and the model may be anything (embeddings, norms, tied weights), where
``backward_samples`` cannot be used. ``at`` is a tensor of that forward pass with one row per
sample along dimension 0 (per-row log-probabilities, logits, hidden states); group ``k``'s
gradient is the chain rule split at ``at``: ``d loss/d at`` with every row of the other groups
zeroed, propagated to the parameters. When the model treats rows independently below ``at``
(no BatchNorm in training mode across groups), that is exactly the gradient of group ``k``'s
terms of the loss, as separate per-group losses would give.

The part of ``d loss/d params`` that does not flow through ``at`` (parameters used between
``at`` and the loss, such as an LM head when ``at`` is the hidden states, a regulariser on the
parameters, an auxiliary term computed from tensors that are not downstream of ``at``, the head's
use of a tied embedding) is ungrouped: added to the update with weight 1. Choose ``at`` as
close to the loss as the rows allow (per-row log-probabilities or logits) to balance every
parameter.

How, exactly and in this many passes:

1. One backward pass of ``loss`` with a hook on ``at`` that keeps the gradient arriving there and
   lets zeros through instead, so only the paths that avoid ``at`` reach the parameters: they go
   to the ungrouped gradient. On one process the pass is restricted (autograd ``inputs=``) to
   ``at`` and the leaves a path avoiding ``at`` reaches, found by one walk of the graph above
   ``at``: usually only the part between ``at`` and the loss runs (plus the node that produced
   ``at``, called with zeros; built-in nodes then compute nothing). Under DDP it is a full pass
   (the part below ``at`` carries zeros) so that DDP's synchronised all-reduce covers every
   parameter.
2. Per group present in the call, in order of first appearance: inside ``opt.group(name)``, one
   backward pass from ``at`` with the kept gradient, other groups' rows zeroed (exact: a select,
   no arithmetic). Under DDP, which averages only the first backward pass after a forward, the
   group's gradient is then averaged over the ranks by one all-reduce of its ``n`` numbers.

Cost: ``G`` backward passes below ``at`` for ``G`` groups present, as ``G`` separate per-group
losses on a retained graph would take, but the part above ``at`` once instead of ``G`` times;
plus, when a parameter below ``at`` is also reached by a path avoiding it (tied embeddings, a
regulariser on it), or under DDP, one more pass below ``at`` carrying zeros. Memory: the kept
gradient (the size of ``at``) during the call. The graph is retained until the last group's pass,
which frees it unless ``retain_graph=True``. Several calls before ``step()`` (chunked forwards)
accumulate into the same groups; a group absent from a call is simply not touched by it. A scaled
loss (``scaler.scale(loss)``) works as with ``opt.group``: every part is scaled and the step
unscales. No per-group loss values are recorded (plugins that weigh losses, ``famo``/``dwa``,
need ``opt.backward``). Under DDP every rank must have the same groups present in each call, in
the same order (or all raise ``GroupMismatchError``); FSDP2 and DeepSpeed are refused.

Tap plugins: place taps between ``at`` and the loss, where their backward runs once. A tap on
``at`` or below it would see the zeros of pass 1 and each group's rows in a separate pass.

Example::

    emb = torch.nn.Embedding(11, 6)
    net = torch.nn.Sequential(emb, torch.nn.LayerNorm(6), torch.nn.Linear(6, 1))
    opt = Balancer(torch.optim.SGD(net.parameters(), lr=0.1), plugins=["task_norm"])
    tokens = torch.randint(0, 11, (4, 5))                  # rows 0-1 chosen, rows 2-3 rejected
    score = net(tokens).squeeze(-1).sum(-1)               # [4]: one value per row
    loss = -F.logsigmoid(score[:2] - score[2:]).mean() + 1e-3 * emb.weight.pow(2).sum()
    opt.backward_rows(loss, at=score, group=["chosen", "chosen", "rejected", "rejected"])
    opt.step()                                            # the regulariser went ungrouped
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from balancer._checks import check_group_name, index_row_groups
from balancer.capture.flat_buffer import TensorKind
from balancer.capture.local import LocalBackend
from balancer.errors import CaptureError

if TYPE_CHECKING:
    from balancer.contract.backend import Backend
    from balancer.step.pending import PendingStep

__all__ = ["capture_rows", "check_rows"]

_CALL = "opt.backward_rows(loss, at=..., group=...)"


def check_rows(pending: PendingStep, loss: Any, at: Any, group: str | Sequence[str]) -> tuple[list[str], Tensor]:
    """Refuses a call that cannot be split (nothing has run yet); returns the groups present, in
    order of first appearance, and each row's index into them."""
    _check_capture(pending)
    _check_tensors(loss, at)
    return _row_groups(at, group)


def capture_rows(
    pending: PendingStep, loss: Tensor, at: Tensor, rows: tuple[list[str], Tensor], retain_graph: bool | None
) -> None:
    """Splits the gradient of ``loss`` by the rows of ``at`` into groups (see the module docstring)."""
    backend = pending.backend
    names, index = rows
    kept = _gradient_at(loss, at, backend)
    shape = (at.shape[0],) + (1,) * (at.dim() - 1)
    for k, name in enumerate(names):
        keep = True if k < len(names) - 1 else retain_graph
        masked = kept.masked_fill((index != k).view(shape), 0)
        with pending.group(name):
            torch.autograd.backward(at, grad_tensors=masked, retain_graph=keep)
            if backend.world_size > 1:
                _average_over_ranks(backend)


# -- checks ------------------------------------------------------------------------------------
def _check_capture(pending: PendingStep) -> None:
    backend = pending.backend
    if backend.active is not None:
        raise CaptureError(
            f"{_CALL} called inside group `{backend.active}`: it opens one group block per group itself. "
            "Call it outside any `opt.group(...)` block."
        )
    if pending.layers is not None and pending.layers.names:
        raise CaptureError(
            f"{_CALL} cannot be mixed with `backward_samples`/`backward_tasks` in one step (groups "
            f"{list(pending.layers.names)} are pending there). Call step() or zero_grad() first."
        )
    if not isinstance(backend, LocalBackend) or backend.kind is not TensorKind:
        raise CaptureError(
            f"{_CALL} works on one process and under DDP. Found the backend `{type(backend).__name__}` "
            "(FSDP2 or DeepSpeed), whose backward passes after one forward do not reduce group gradients. "
            "Use one forward per group with `opt.group(name)` instead."
        )
    pending.start(_CALL)


def _check_tensors(loss: Any, at: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        found = type(loss).__name__ if not isinstance(loss, Tensor) else f"shape {tuple(loss.shape)}"
        found += "" if not isinstance(loss, Tensor) or loss.requires_grad else ", requires_grad=False"
        raise CaptureError(
            f"{_CALL}: `loss` must be a scalar tensor that requires grad. Found {found}. Reduce it first "
            "(`.mean()`/`.sum()`) and compute it from the model's output."
        )
    if not isinstance(at, Tensor) or at.dim() == 0:
        found = type(at).__name__ if not isinstance(at, Tensor) else "a 0-d tensor"
        raise CaptureError(
            f"{_CALL}: `at` must be a tensor with one row per sample along dimension 0 (e.g. [B] log-probs, "
            f"[B, T, V] logits). Found {found}."
        )
    if not at.requires_grad:
        raise CaptureError(
            f"{_CALL}: `at` (shape {tuple(at.shape)}) does not require grad, so no parameter gradient flows "
            "through it. Pass a tensor computed from the parameters in grad mode (not detached, not under no_grad)."
        )
    if at.grad_fn is None:
        raise CaptureError(
            f"{_CALL}: `at` (shape {tuple(at.shape)}) is a leaf tensor (a parameter or an input): there is no "
            "graph below it to split by rows. Pass a tensor computed from the parameters, e.g. the logits or "
            "the per-row log-probabilities."
        )


def _row_groups(at: Tensor, group: str | Sequence[str]) -> tuple[list[str], Tensor]:
    """The groups present, in order of first appearance, and each row's index into them (on ``at``'s device)."""
    rows = at.shape[0]
    if isinstance(group, str):
        check_group_name(group)
        per_row = [group] * rows
    else:
        per_row = list(group)
        if len(per_row) != rows:
            raise CaptureError(
                f"{_CALL} needs one group name per row of `at`: it has {rows} rows (dimension 0, shape "
                f"{tuple(at.shape)}), found {len(per_row)} names. Pass `group=` a list as long as the batch, "
                "or one string for all rows."
            )
    names, index = index_row_groups(per_row, at.device)
    return list(names), index


# -- the passes --------------------------------------------------------------------------------
def _leaves_avoiding(loss: Tensor, at: Tensor) -> list[Tensor]:
    """Leaves that require grad and that ``loss`` reaches by a path avoiding ``at``; raises if
    ``loss`` does not depend on ``at``. Walks only the graph above ``at`` (and whatever else such a
    path reaches)."""
    edge = (at.grad_fn, at.output_nr)
    found = False
    leaves: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack: list[Any] = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves[id(variable)] = variable
        for next_node, nr in node.next_functions:
            if next_node is edge[0] and nr == edge[1]:
                found = True
            elif next_node is not None:
                stack.append(next_node)
    if not found:
        raise CaptureError(
            f"{_CALL}: the loss does not depend on `at` (shape {tuple(at.shape)}): it is not part of the "
            "loss's autograd graph (computed in another forward, detached, or replaced in place). Pass the "
            "tensor the loss was computed from."
        )
    return list(leaves.values())


def _gradient_at(loss: Tensor, at: Tensor, backend: Backend) -> Tensor:
    """Pass 1: the paths avoiding ``at`` go to the ungrouped gradient; returns ``d loss/d at``."""
    leaves = _leaves_avoiding(loss, at)
    kept: list[Tensor] = []

    def keep_and_block(grad: Tensor) -> Tensor:
        kept.append(grad)
        return torch.zeros_like(grad)

    handle = at.register_hook(keep_and_block)
    try:
        if backend.world_size > 1:  # DDP synchronises this pass: every parameter must get its gradient
            torch.autograd.backward(loss, retain_graph=True)
        else:
            inputs: list[Any] = [get_gradient_edge(at), *leaves]  # torch takes edges and tensors together
            torch.autograd.backward(loss, inputs=inputs, retain_graph=True)
    finally:
        handle.remove()
    assert len(kept) == 1, "the loss depends on `at` and the pass asked for its gradient: the hook ran once"
    return kept[0]


@torch.no_grad()
def _average_over_ranks(backend: Backend) -> None:
    """Under DDP: ``.grad`` (this group's row, or its fresh gradient) averaged over the ranks, one
    all-reduce per (device, dtype). Averaging is linear and leaves the row's earlier, already
    replicated content as it is (to rounding), as DDP's own averaging of an accumulated gradient does."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in backend.trained_parameters():
        if p.requires_grad and (p.grad is None or p.grad.layout == torch.strided):
            by_key.setdefault((p.device, p.dtype), []).append(p)  # a sparse gradient is refused at exit
    world = backend.world_size
    for (device, dtype), params in by_key.items():
        flat = torch.cat(
            [
                torch.zeros(p.numel(), device=device, dtype=dtype) if p.grad is None else p.grad.reshape(-1)
                for p in params
            ]
        )
        flat = backend.all_reduce(flat, "sum").div_(world)
        for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
            if p.grad is None:
                p.grad = part.view_as(p)
            else:
                p.grad.copy_(part.view_as(p.grad))
