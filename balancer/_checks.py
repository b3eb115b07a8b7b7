"""Input validation for the Balancer: each check names what was wrong, the value found, and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from balancer.contract.stats import GroupStats
from balancer.errors import CaptureError, PluginError


def check_options(on_nonfinite: Any, max_grad_norm: Any, norm_type: Any) -> None:
    """``Balancer(...)`` options that do not fit (the clip's own values are checked by ``ClipRequest``)."""
    if on_nonfinite not in ("zero", "raise"):
        raise ValueError(f"`on_nonfinite` must be 'zero' or 'raise'. Found `on_nonfinite = {on_nonfinite!r}`.")
    if max_grad_norm is None and norm_type not in (2, 2.0):
        raise ValueError(
            f"`norm_type = {norm_type!r}` without `max_grad_norm` would be ignored: set max_grad_norm too."
        )


def check_group_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise CaptureError(f"A group name must be a non-empty string. Found `{name!r}`.")


def index_row_groups(per_row: Sequence[str], device: torch.device) -> tuple[tuple[str, ...], Tensor]:
    """The distinct group names of the rows, in order of first appearance (each checked), and each
    row's index into them: a ``[rows]`` long tensor on ``device``."""
    names: dict[str, int] = {}
    for name in per_row:
        if name not in names:
            check_group_name(name)
            names[name] = len(names)
    index = torch.tensor([names[n] for n in per_row], dtype=torch.long).to(device, non_blocking=True)
    return tuple(names), index


def check_loss(name: str, loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise CaptureError(f"The loss of group `{name}` must be a tensor. Found `{type(loss).__name__}`.")
    if loss.numel() != 1:
        raise CaptureError(
            f"The loss of group `{name}` must be a scalar. Found shape {tuple(loss.shape)}; reduce it first "
            "(e.g. `.mean()` or `.sum()`)."
        )
    if not loss.requires_grad:
        raise CaptureError(
            f"The loss of group `{name}` does not require grad: it is not connected to any trained parameter."
        )


def check_losses(method: str, losses: Any) -> None:
    """``losses`` must be a non-empty ``{group name: scalar loss}`` dict (``method``: who asks)."""
    if not isinstance(losses, Mapping) or not losses:
        raise CaptureError(f"{method} takes a non-empty dict {{group name: scalar loss}}. Found `{losses!r}`.")
    for name, loss in losses.items():
        check_group_name(name)
        check_loss(name, loss)


def check_model_params(model: torch.nn.Module, trained: Iterable[Tensor]) -> None:
    known = {id(p) for p in trained}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CaptureError(
            f"{len(missing)} trainable parameter(s) of the model are not in the inner optimizer: {shown}. "
            "Their gradients would never be balanced or applied. Pass them to the optimizer, or set "
            "`requires_grad_(False)` on the ones you mean to freeze."
        )


def graph_leaves(losses: Iterable[Tensor]) -> list[Tensor]:
    """The tensors that require grad at the leaves of the losses' autograd graphs (one walk)."""
    seen: set[int] = set()
    stack: list[Any] = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    leaves: list[Tensor] = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def check_graph_leaves(losses: Iterable[Tensor], trained: Iterable[Tensor]) -> None:
    """Walks the autograd graphs once and refuses leaves that require grad but are not optimized."""
    known = {id(p) for p in trained}
    foreign = [tuple(leaf.shape) for leaf in graph_leaves(losses) if id(leaf) not in known]
    if foreign:
        raise CaptureError(
            f"{len(foreign)} tensor(s) that require grad feed these losses but are not in the inner optimizer "
            f"(shapes {foreign[:5]}). Their gradients would never be balanced or applied. Add them to the "
            "optimizer or call `requires_grad_(False)` on them. A [batch, seq, hidden] tensor here is usually "
            "the embedding output that transformers' `model.enable_input_require_grads()` makes require grad "
            "(gradient checkpointing with frozen embeddings, e.g. PEFT/LoRA): call "
            "`model.disable_input_require_grads()` and checkpoint with "
            "`gradient_checkpointing_kwargs={'use_reentrant': False}`, which does not need it."
        )


def check_weights(plugin: str, weights: Any, stats: GroupStats) -> Tensor:
    k = stats.num_groups
    if not isinstance(weights, Tensor):
        raise PluginError(f"Plugin `{plugin}` returned `{type(weights).__name__}`; weights must be a tensor.")
    if weights.shape != (k,):
        raise PluginError(
            f"Plugin `{plugin}` returned weights of shape {tuple(weights.shape)} for {k} groups. "
            f"Weights must have one entry per group: {list(stats.names)}. Step refused; parameters untouched."
        )
    if weights.device != stats.gram.device:
        raise PluginError(
            f"Plugin `{plugin}` returned weights on `{weights.device}`; they must be on the stats device "
            f"`{stats.gram.device}` (create them from `stats.gram` or the incoming weights)."
        )
    if not weights.is_floating_point():
        raise PluginError(f"Plugin `{plugin}` returned weights of dtype {weights.dtype}; use a floating dtype.")
    return weights.to(torch.float64)
